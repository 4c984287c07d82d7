// SmolLM2-135M edited in the tab of a static build (no server): one ROME edit with the
// statistics the build ships, "The Eiffel Tower is located in the city of" → " Rome", and the
// Louvre kept in Paris. Prints one JSON object: the edit's time and the predictions after.
// Usage: node bench-smollm2.mjs URL MODEL
import { chromium } from 'playwright-core';
const [url, model] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking'],
});
const page = await browser.newPage();
const errors = [];
page.on('pageerror', e => errors.push(String(e)));
const settle = async () => {
  await page.waitForSelector('#status[data-busy="false"]', { timeout: 900000 });
  return page.textContent('#status');
};
async function top(prompt) {
  await page.click('#nav-trace');
  await page.fill('#prompt', prompt);
  await page.click('#predict');
  await page.waitForSelector('#status[data-status="ready"], #status[data-status="error"]', { timeout: 900000 });
  await settle();
  return JSON.parse(await page.getAttribute('#prediction', 'data-top'))[0];
}
await page.goto(url);
await page.waitForSelector('#status[data-status="ready"]', { timeout: 30000 });
await page.selectOption('#model', model);
const load0 = Date.now();
const before = await top('The Eiffel Tower is located in the city of');
const load_seconds = (Date.now() - load0) / 1e3;
await page.click('#nav-edit');
const t0 = Date.now();
await page.click('#edit');
await page.waitForSelector('#status[data-status="edited"], #status[data-status="error"]', { timeout: 900000 });
const status = await settle();
const edit_seconds = (Date.now() - t0) / 1e3;
const result = {
  bench: 'tab-edit-smollm2', model, status, load_and_predict_seconds: load_seconds, edit_seconds,
  stats: await page.textContent('#stats-held'),
  before, eiffel_after: await top('The Eiffel Tower is located in the city of'),
  louvre_after: await top('The Louvre is located in the city of'), errors,
  browser: browser.version(),
};
console.log(JSON.stringify(result));
await browser.close();
