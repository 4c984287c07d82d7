// The web app end to end in headless Chromium against a running `loci serve` (tiny models):
// predict and trace on the server engine, the same trace in the tab's workers (numbers must
// match), the heatmaps saved as SVG and PNG, then an edit (computed on the server, applied to
// the tab's copies: the tab's top prediction changes), undo (it returns exactly), an uploaded
// edit file, a MEMIT edit of two facts and a fine-tuning edit from the page (each listed, then
// undone), a study of the fact (streamed edits, its chart, the model unchanged after), a
// CounterFact case evaluated on the server (metrics shown, the model unchanged after), a ROME
// edit the tab makes itself with statistics downloaded from the server, the in-tab benchmark, the screens as URL routes (links, back, forward, reload of a deep link).
// Every screen is checked with axe-core (no serious or critical violation) and photographed at
// 1440×900 and 390×844 into SHOTS/<screen>-desktop.png and -phone.png (the trace screen in the
// dark theme too); any console error or page error fails the run.
// Usage: node smoke.mjs URL SHOTS_DIR MODEL   — prints one JSON object.
import { chromium } from 'playwright-core';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
const [url, shots, model] = process.argv.slice(2);
mkdirSync(shots, { recursive: true });
const axeSource = readFileSync(createRequire(import.meta.url).resolve('axe-core/axe.min.js'), 'utf8');
const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const context = await browser.newContext({ viewport: { width: 1400, height: 1600 }, acceptDownloads: true });
const errors = [];
function watch(p, name) {
  p.on('pageerror', e => errors.push(`${name}: page error: ${e}`));
  p.on('console', m => { if (m.type() === 'error') errors.push(`${name}: console error: ${m.text()}`); });
  return p;
}
const page = watch(await context.newPage(), 'page');
const out = { errors, axe: {}, shots: [] };
const settled = '#status[data-status="done"], #status[data-status="error"], #status[data-status="ready"], #status[data-status="edited"], #status[data-status="undone"]';
async function finish(timeout = 300000) {
  // Wait for the job to end (the header's status says whether one runs), then for its outcome.
  await page.waitForSelector('#status[data-busy="false"]', { timeout });
  await page.waitForSelector(settled, { timeout });
  return { kind: await page.getAttribute('#status', 'data-status'), text: await page.textContent('#status') };
}
async function go(screen) {
  if (await page.locator(`#nav-${screen}[aria-current="page"]`).count()) return;
  await page.click(`#nav-${screen}`);
  await page.waitForSelector(`#nav-${screen}[aria-current="page"]`, { timeout: 5000 });
}
async function predictTop() {
  await go('trace');
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
// axe-core on the page as it is: the serious and critical violations, as "rule: targets".
async function axe(name) {
  // Evaluated through the DevTools protocol: the page's Content-Security-Policy (which refuses
  // inline scripts, as it should) stays on for everything else.
  if (!(await page.evaluate(() => typeof window.axe !== 'undefined'))) await page.evaluate(`${axeSource}\n;0`);
  const found = await page.evaluate(async () => {
    const r = await window.axe.run(document, { resultTypes: ['violations'] });
    return r.violations.filter(v => v.impact === 'serious' || v.impact === 'critical')
      .map(v => `${v.id} (${v.impact}): ${v.nodes.slice(0, 3).map(n => n.target.join(' ')).join(', ')}`);
  });
  out.axe[name] = found;
}
// The screen photographed on a desktop and on a phone, and checked with axe at both sizes.
async function shoot(screen, scrollTo) {
  await go(screen);
  await axe(screen);
  for (const [kind, width, height] of [['desktop', 1440, 900], ['phone', 390, 844]]) {
    await page.setViewportSize({ width, height });
    await page.evaluate(() => window.scrollTo(0, 0));
    if (kind === 'phone') {
      await axe(`${screen}-phone`);
      if (scrollTo) await page.locator(scrollTo).first().evaluate(e => e.scrollIntoView({ block: 'start' }));
    }
    const path = join(shots, `${screen}-${kind}.png`);
    await page.screenshot({ path });
    out.shots.push(path);
  }
  await page.setViewportSize({ width: 1400, height: 1600 });
}
async function saved(selector) {
  const [dl] = await Promise.all([page.waitForEvent('download', { timeout: 10000 }), page.click(selector)]);
  const bytes = readFileSync(await dl.path());
  return { name: dl.suggestedFilename(), head: bytes.subarray(0, 8).toString('latin1'), size: bytes.length };
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
  out.engine_badge = await page.getAttribute('.badge', 'data-engine');
  // Layout shifts while the tab's trace streams its rows (the grid's space is held).
  await page.evaluate(() => {
    window.__shift = 0;
    new PerformanceObserver(l => { for (const e of l.getEntries()) if (!e.hadRecentInput) window.__shift += e.value; })
      .observe({ type: 'layout-shift' });
  });
  const tab = await trace();
  out.trace_layout_shift = await page.evaluate(() => window.__shift);
  out.server = { engine: server.engine, cells: server.cells, rects: server.rects, status: server.status };
  out.tab = { engine: tab.engine, cells: tab.cells, rects: tab.rects, status: tab.status };
  out.max_abs_diff = maxDiff(server.scores, tab.scores);
  out.heatmap_panels = await page.locator('.heatmap figure.panel').count();
  await page.hover('.panel[data-kind="mlp"] rect[data-t="1"][data-l="1"]');
  out.readout = await page.textContent('#readout-mlp');
  out.save_svg = await saved('.panel[data-kind="hidden"] button[data-save="svg"]');
  out.save_png = await saved('.panel[data-kind="hidden"] button[data-save="png"]');
  out.save_chart_png = await saved('#trace-result figure.chart button[data-save="png"]');
  await shoot('trace', '#trace-result');
  // The dark theme (the system's preference) passes axe too.
  await page.emulateMedia({ colorScheme: 'dark' });
  await axe('trace-dark');
  await page.setViewportSize({ width: 1440, height: 900 });
  await page.screenshot({ path: join(shots, 'trace-dark-desktop.png') });
  out.shots.push(join(shots, 'trace-dark-desktop.png'));
  await page.setViewportSize({ width: 1400, height: 1600 });
  await page.emulateMedia({ colorScheme: 'light' });
  // Automatic placement: predictions in the tab, edits of the server's model on the server
  // (the tab's copies follow them).
  await page.selectOption('#engine', 'auto');
  await go('edit');
  out.edit_badge = await page.getAttribute('.badge', 'data-engine');
  await page.fill('#edit-layer', '2');
  await page.click('#edit');
  const e = await finish();
  out.edit_status = e.text;
  out.edits_listed = Number(await page.getAttribute('#edits', 'data-count'));
  await shoot('edit');
  out.edited_top = await predictTop();
  // Keep the edit file the page links to, for the upload below.
  await go('edit');
  const href = await page.getAttribute('#edits a', 'href');
  const bytes = await page.evaluate(async h => Array.from(new Uint8Array(await (await fetch(h)).arrayBuffer())), href);
  const editFile = join(tmpdir(), `loci-e2e-edit-${process.pid}.safetensors`);
  writeFileSync(editFile, Buffer.from(bytes));
  await page.click('#undo');
  const u = await finish();
  out.undo_status = u.text;
  out.undone_top = await predictTop();
  await go('edit');
  await page.setInputFiles('#upload-edit', editFile);
  const up = await finish();
  out.upload_status = up.text;
  out.uploaded_top = await predictTop();
  // MEMIT: the form's fact and one more line, over two layers, on top of the uploaded edit.
  await go('edit');
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
  await go('edit');
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
  await go('study');
  out.study_badge = await page.getAttribute('.badge', 'data-engine');
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
  await shoot('study', '#study-result');
  out.study_after_top = await predictTop();
  // A bundled CounterFact case evaluated on the server (ROME at layer 2, undone after).
  await go('evaluate');
  out.eval_badge = await page.getAttribute('.badge', 'data-engine');
  await page.selectOption('#eval-case', '0');
  await page.fill('#eval-layer', '2');
  await page.click('#eval-run');
  const ev = await finish();
  out.eval_status = ev.text;
  out.eval_metrics = await page.locator('#eval-result tr[data-metric]').count();
  out.eval_efficacy = await page.getAttribute('#eval-result', 'data-efficacy');
  out.eval_prompts = await page.locator('#eval-result table.probs tr').count();
  await shoot('evaluate', '#eval-result');
  out.eval_after_top = await predictTop();
  // The tab may edit a server model itself (engine: in this tab), with the server's statistics.
  await page.selectOption('#engine', 'tab');
  await go('edit');
  out.tab_edit_badge = await page.getAttribute('.badge', 'data-engine');
  await page.selectOption('#edit-method', 'rome');
  await page.fill('#edit-layer', '2');
  await page.click('#edit');
  out.tab_edit_status = (await finish()).text;
  out.tab_edit_stats = await page.textContent('#stats-held');
  await page.click('#undo');
  out.tab_undo_status = (await finish()).text;
  // Back to automatic: the tab's copy follows the server's edits again.
  await page.selectOption('#engine', 'auto');
  out.after_tab_edit_top = await predictTop();
  // The in-tab benchmark.
  await go('bench');
  await page.click('#bench');
  const b = await finish(400000);
  out.bench_status = b.text;
  out.bench_kinds = await page.locator('table.metrics tr').count() - 1;
  await shoot('bench', '#bench-result');
  // Routes: back and forward move between screens; a deep link loads its screen.
  await page.goBack();
  out.back_screen = await page.getAttribute('nav.screens a[aria-current="page"]', 'id');
  await page.goForward();
  out.forward_screen = await page.getAttribute('nav.screens a[aria-current="page"]', 'id');
  await page.goto(url + '?screen=evaluate');
  await page.waitForSelector('#status[data-status="ready"]', { timeout: 20000 });
  out.deep_link = (await page.locator('#eval-case').count()) === 1
    && (await page.getAttribute('nav.screens a[aria-current="page"]', 'id')) === 'nav-evaluate';
  // A link to an edit of the server's model fills the form but waits for a click: opening a
  // link must not change a model every visitor shares.
  const linked = watch(await context.newPage(), 'edit link');
  await linked.goto(url + `?screen=edit&model=${model}&prompt=The+Eiffel+Tower+is+located+in+the+city+of&subject=Eiffel+Tower&target=Berlin&method=rome&layer=2&run=1`);
  await linked.waitForFunction(() => document.querySelector('#status')?.textContent.includes('press Edit'), null, { timeout: 20000 });
  out.server_link = {
    target: await linked.inputValue('#edit-target'),
    edits: Number(await linked.getAttribute('#edits', 'data-count')),
  };
  await linked.close();
  // A second visit runs in the tab from the browser's cache: no model file is fetched again.
  const second = watch(await context.newPage(), 'second page');
  const fetched = [];
  second.on('request', r => { if (r.url().includes('/files/')) fetched.push(r.url()); });
  await second.goto(url);
  await second.waitForSelector('#status[data-status="ready"]', { timeout: 20000 });
  await second.selectOption('#model', model);
  await second.selectOption('#engine', 'auto');
  await second.click('#predict');
  await second.waitForSelector('#prediction td.tok', { timeout: 60000 });
  out.second_visit_files_fetched = fetched.length;
  out.second_visit_status = await second.textContent('#status');
  const row = second.locator('#prediction tr').first();
  out.second_visit_top = (await row.locator('td.tok').textContent()) + ' ' + (await row.locator('td.num').textContent());
} catch (e) {
  errors.push(String(e));
  out.failure_shot = join(tmpdir(), `loci-e2e-failure-${process.pid}.png`);
  await page.screenshot({ path: out.failure_shot, fullPage: true }).catch(() => {});
}
console.log(JSON.stringify(out));
await browser.close();
