// The web app end to end in headless Chromium against a running `loci serve` (tiny models):
// predict and trace on the server engine, the same trace in the tab's workers (numbers must
// match), then an edit (computed on the server, applied to the tab's copies: the tab's top
// prediction changes), undo (it returns exactly), an uploaded edit file, a MEMIT edit of two
// facts and a fine-tuning edit from the page (each listed, then undone), a study of the fact
// (streamed edits, its chart, the model unchanged after), and a screenshot.
// Usage: node smoke.mjs URL SCREENSHOT.png MODEL   — prints one JSON object.
import { chromium } from 'playwright-core';
import { writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
const [url, shot, model] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const context = await browser.newContext({ viewport: { width: 1400, height: 1600 } });
const page = await context.newPage();
const errors = [];
page.on('pageerror', e => errors.push(String(e)));
const out = { errors };
const settled = '#status[data-status="done"], #status[data-status="error"], #status[data-status="ready"], #status[data-status="edited"], #status[data-status="undone"]';
async function finish(timeout = 300000) {
  // Wait for the job to start, then to end.
  await page.waitForFunction(() => document.querySelector('#predict').disabled === false, null, { timeout });
  await page.waitForSelector(settled, { timeout });
  return { kind: await page.getAttribute('#status', 'data-status'), text: await page.textContent('#status') };
}
async function predictTop() {
  await page.click('#predict');
  const s = await finish();
  if (s.kind === 'error') throw new Error('predict: ' + s.text);
  const row = page.locator('#prediction tr').first();
  return (await row.locator('td.tok').textContent()) + ' ' + (await row.locator('td.num').textContent());
}
async function trace() {
  await page.click('#trace');
  const s = await finish();
  if (s.kind !== 'done') throw new Error('trace: ' + s.text);
  return {
    status: s.text,
    engine: await page.getAttribute('#trace-result', 'data-engine'),
    cells: Number(await page.getAttribute('#trace-result', 'data-cells')),
    rects: await page.locator('.heatmap rect[data-t]').count(),
    scores: JSON.parse(await page.getAttribute('#trace-result', 'data-scores')),
  };
}
function maxDiff(a, b) {
  let m = 0;
  for (const k of Object.keys(a)) a[k].forEach((row, t) => row.forEach((x, l) => { m = Math.max(m, Math.abs(x - b[k][t][l])); }));
  return m;
}
try {
  await page.goto(url);
  await page.waitForSelector('#status[data-status="ready"]', { timeout: 20000 });
  await page.selectOption('#model', model);
  await page.selectOption('#engine', 'server');
  out.server_top = await predictTop();
  const server = await trace();
  await page.selectOption('#engine', 'tab');
  out.tab_top = await predictTop();
  out.engine_choice = await page.textContent('#engine-choice');
  const tab = await trace();
  out.server = { engine: server.engine, cells: server.cells, rects: server.rects, status: server.status };
  out.tab = { engine: tab.engine, cells: tab.cells, rects: tab.rects, status: tab.status };
  out.max_abs_diff = maxDiff(server.scores, tab.scores);
  await page.fill('#edit-layer', '2');
  await page.click('#edit');
  const e = await finish();
  out.edit_status = e.text;
  out.edits_listed = Number(await page.getAttribute('#edits', 'data-count'));
  out.edited_top = await predictTop();
  // Keep the edit file the page links to, for the upload below.
  const href = await page.getAttribute('#edits a', 'href');
  const bytes = await page.evaluate(async h => Array.from(new Uint8Array(await (await fetch(h)).arrayBuffer())), href);
  const editFile = join(tmpdir(), `loci-e2e-edit-${process.pid}.safetensors`);
  writeFileSync(editFile, Buffer.from(bytes));
  await page.click('#undo');
  const u = await finish();
  out.undo_status = u.text;
  out.undone_top = await predictTop();
  await page.setInputFiles('#upload-edit', editFile);
  const up = await finish();
  out.upload_status = up.text;
  out.uploaded_top = await predictTop();
  // MEMIT: the form's fact and one more line, over two layers, on top of the uploaded edit.
  await page.selectOption('#edit-method', 'memit');
  await page.fill('#edit-layer', '1,2');
  await page.fill('#edit-more', 'Michael Jordan plays the sport of | Michael Jordan | soccer');
  await page.click('#edit');
  const me = await finish();
  out.memit_status = me.text;
  out.memit_facts = Number(await page.getAttribute('#memit-result', 'data-facts'));
  out.memit_listed = Number(await page.getAttribute('#edits', 'data-count'));
  out.memit_label = await page.textContent('#edits p:last-child');
  await page.click('#undo');
  await finish();
  out.memit_undone_top = await predictTop();
  // Constrained fine-tuning of the form's fact at layer 1, then undone.
  await page.selectOption('#edit-method', 'ft');
  await page.fill('#edit-layer', '1');
  await page.click('#edit');
  const fe = await finish();
  out.ft_status = fe.text;
  out.ft_label = await page.textContent('#edits p:last-child');
  out.ft_result = await page.locator('#edit-result').count();
  await page.click('#undo');
  await finish();
  out.ft_undone_top = await predictTop();
  // Hase et al.'s study of the form's fact (the tiny model does not know it: study it anyway):
  // ROME and FT-1, error injection and fact erasure, at layers 1 and 2.
  await page.fill('#study-true', 'Paris');
  await page.check('#study-all');
  await page.check('#study-method-ft-1');
  await page.check('#study-problem-fact_erasure');
  await page.fill('#study-layers', '1,2');
  await page.click('#study');
  const st = await finish();
  out.study_status = st.text;
  out.study_edits = Number(await page.getAttribute('#study-result', 'data-edits'));
  out.study_rows = await page.locator('#study-result table tr').count();
  out.study_chart = await page.locator('#study-result .curves svg circle').count();
  await page.screenshot({ path: shot, fullPage: true });
  out.study_after_top = await predictTop();
  // A second visit runs in the tab from the browser's cache: no model file is fetched again.
  const second = await context.newPage();
  const fetched = [];
  second.on('request', r => { if (r.url().includes('/files/')) fetched.push(r.url()); });
  await second.goto(url);
  await second.waitForSelector('#status[data-status="ready"]', { timeout: 20000 });
  await second.selectOption('#model', model);
  await second.selectOption('#engine', 'tab');
  await second.click('#predict');
  await second.waitForSelector('#prediction td.tok', { timeout: 60000 });
  out.second_visit_files_fetched = fetched.length;
  out.second_visit_status = await second.textContent('#status');
  const row = second.locator('#prediction tr').first();
  out.second_visit_top = (await row.locator('td.tok').textContent()) + ' ' + (await row.locator('td.num').textContent());
} catch (e) {
  errors.push(String(e));
  await page.screenshot({ path: shot, fullPage: true }).catch(() => {});
}
console.log(JSON.stringify(out));
await browser.close();
