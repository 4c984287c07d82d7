// Loads the app from a running `loci serve`, predicts and traces on the server engine, and
// saves a screenshot. Usage: node smoke.mjs URL SCREENSHOT.png [MODEL]
import { chromium } from 'playwright-core';
const [url, shot, model] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const page = await browser.newPage({ viewport: { width: 1400, height: 1100 } });
const errors = [];
page.on('pageerror', e => errors.push(String(e)));
await page.goto(url);
await page.waitForSelector('#status[data-status="ready"]', { timeout: 20000 });
if (model) await page.selectOption('#model', model);
await page.click('#predict');
await page.waitForSelector('#prediction td.tok', { timeout: 30000 });
const top = await page.textContent('#prediction td.tok');
await page.click('#trace');
await page.waitForSelector('#status[data-status="done"], #status[data-status="error"]', { timeout: 300000 });
const status = await page.textContent('#status');
const cells = await page.getAttribute('#trace-result', 'data-cells');
const rects = await page.locator('.heatmap rect[data-t]').count();
await page.screenshot({ path: shot, fullPage: true });
console.log(JSON.stringify({ top, status, cells: Number(cells), rects, errors }));
await browser.close();
if (errors.length) process.exit(1);
