// A static build with the real SmolLM2-135M, for what the tiny model is too fast to show:
// an edit cancelled mid-way (the computing worker is stopped and replaced, every copy keeps its
// weights: the same predictions to the bit, one digest in all workers), and a model shape too
// big for a worker's memory (GPT-2 XL on the Benchmark screen: the page names the limit).
// Usage: node static-real.mjs URL MODEL — prints one JSON object.
import { chromium } from 'playwright-core';
const [url, model] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking'],
});
const page = await browser.newPage();
const errors = [];
page.on('pageerror', e => errors.push(String(e)));
const out = { errors };
const settle = () => page.waitForSelector('#status[data-busy="false"]', { timeout: 600000 });
async function predict() {
  await page.click('#nav-trace');
  await page.click('#predict');
  await page.waitForSelector('#status[data-busy="true"]', { timeout: 10000 }).catch(() => {});
  await settle();
  return JSON.parse(await page.getAttribute('#prediction', 'data-top'));
}
try {
  await page.goto(url);
  await page.waitForSelector('#status[data-status="ready"]', { timeout: 30000 });
  await page.selectOption('#model', model);
  out.before = await predict();
  // Fine-tuning needs no statistics; cancel it once its first step has streamed.
  await page.click('#nav-edit');
  await page.selectOption('#edit-method', 'ft');
  await page.click('#edit');
  await page.waitForSelector('#edit-loss:has-text("loss")', { timeout: 300000 });
  out.steps_seen = await page.textContent('#edit-loss');
  await page.click('#edit-cancel');
  await settle();
  out.cancelled = await page.textContent('#status');
  out.listed = Number(await page.getAttribute('#edits', 'data-count'));
  out.digest = await page.textContent('#weights-digest');
  out.after = await predict();
  // A shape bigger than a worker's 4 GiB.
  await page.click('#nav-bench');
  await page.selectOption('#bench-preset', 'gpt2-xl');
  await page.click('#bench');
  await page.waitForSelector('#status[data-status="error"], #status[data-status="done"]', { timeout: 600000 });
  await settle();
  out.oom = await page.textContent('#status');
  // The page goes on: the model's own workers still answer.
  out.after_oom = await predict();
} catch (e) {
  errors.push(String(e));
}
console.log(JSON.stringify(out));
await browser.close();
