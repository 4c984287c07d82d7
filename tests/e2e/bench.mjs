// The in-tab benchmarks in headless Chromium: opens the app's Benchmark screen, presses "Run
// benchmark" (tracing) or, with `edit`, "Benchmark an edit" (key statistics and one ROME edit),
// and prints the JSON the page reports. Usage: node bench.mjs URL [edit]
import { chromium } from 'playwright-core';
const [url, which] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking'],
});
const page = await browser.newPage();
const errors = [];
page.on('pageerror', e => errors.push(String(e)));
await page.goto(new URL('?screen=bench', url).href);
await page.waitForSelector('#status[data-status="ready"]', { timeout: 20000 });
await page.click(which === 'edit' ? '#bench-edit' : '#bench');
await page.waitForSelector('#status[data-status="done"], #status[data-status="error"]', { timeout: 900000 });
const text = await page.textContent('#bench-result');
if (!text.trim()) {
  console.error('benchmark failed:', await page.textContent('#status'), errors);
  process.exit(1);
}
console.log(JSON.stringify({ ...JSON.parse(text), browser: browser.version() }));
await browser.close();
