// The static build end to end in headless Chromium: the page served by a plain static file
// server (no `loci` process), every job in the tab's workers. Key statistics computed in the
// tab, a ROME edit (the prediction changes), its file downloaded, undo (the weights' digest is
// back bit for bit), bad statistics and edit files refused with the model unchanged, a file
// made by `loci edit --save-edit` applied, MEMIT of two facts, fine-tuning and GRACE (each undone
// exactly), the statistics kept for a second visit, a sequential run's results file drawn, and a
// shareable link reproducing the edit form and a trace in another tab.
// Usage: node static.mjs URL MODEL OUT_DIR NATIVE_EDIT OTHER_STATS OTHER_EDIT SHOTS SEQUENCE — prints one JSON
// object; the downloaded edit file is OUT_DIR/tab-edit.safetensors, the Edit screen after the
// ROME edit SHOTS/edit-tab-desktop.png.
import { chromium } from 'playwright-core';
import { copyFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
const [url, model, outDir, nativeEdit, otherStats, otherEdit, shots, sequence] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const context = await browser.newContext({ viewport: { width: 1400, height: 1600 }, acceptDownloads: true });
const errors = [];
function watch(p, name) {
  p.on('pageerror', e => errors.push(`${name}: page error: ${e}`));
  p.on('console', m => {
    // A static host answers the page's server probe with 404: expected, not an error.
    if (m.type() === 'error' && !m.text().includes('404')) errors.push(`${name}: console error: ${m.text()}`);
  });
  return p;
}
let page = watch(await context.newPage(), 'page');
const out = { errors };
async function finish(timeout = 300000) {
  await page.waitForSelector('#status[data-busy="false"]', { timeout });
  await page.waitForSelector('#status:not([data-status="running"]):not([data-status="loading"])', { timeout });
  return { kind: await page.getAttribute('#status', 'data-status'), text: await page.textContent('#status') };
}
async function go(screen) {
  if (await page.locator(`#nav-${screen}[aria-current="page"]`).count()) return;
  await page.click(`#nav-${screen}`);
  await page.waitForSelector(`#nav-${screen}[aria-current="page"]`, { timeout: 5000 });
}
async function predict() {
  await go('trace');
  await page.click('#predict');
  const s = await finish();
  if (s.kind === 'error') throw new Error('predict: ' + s.text);
  return JSON.parse(await page.getAttribute('#prediction', 'data-top'));
}
async function click(selector) {
  await go('edit');
  await page.click(selector);
  return finish();
}
const digest = () => page.textContent('#weights-digest');
const held = async () => Number(await page.getAttribute('#stats-held', 'data-count'));
const listed = async () => Number(await page.getAttribute('#edits', 'data-count'));
async function upload(selector, path) {
  await go('edit');
  await page.setInputFiles(selector, path);
  return finish();
}
try {
  await page.goto(url);
  await page.waitForSelector('#status[data-status="ready"]', { timeout: 30000 });
  out.ready = await page.textContent('#status');
  out.server_option_disabled = await page.locator('#engine option[value="server"]').isDisabled();
  await page.selectOption('#model', model);
  out.before = await predict();
  await go('edit');
  out.edit_badge = await page.getAttribute('.badge', 'data-engine');
  out.edit_where = await page.textContent('#edit-where');
  // ROME at layer 2 before any statistics: the page asks for them and changes nothing.
  await page.fill('#edit-layer', '2');
  out.no_stats = await click('#edit');
  // Statistics computed in the tab's workers from the bundled Wikipedia slice.
  await page.fill('#stats-tokens', '3000');
  out.stats = await click('#stats-compute');
  out.stats_held = await page.textContent('#stats-held');
  out.digest_original = await digest();
  // Bad statistics files: garbage, and another model's; nothing changes.
  const garbage = join(outDir, 'garbage.safetensors');
  writeFileSync(garbage, 'not a safetensors file at all');
  out.bad_stats = await upload('#stats-file', garbage);
  out.other_stats = await upload('#stats-file', otherStats);
  out.held_after_bad = await held();
  // Bad requests: a subject not in the prompt, an empty target.
  await page.fill('#edit-subject', 'Colosseum');
  out.bad_subject = await click('#edit');
  await page.fill('#edit-subject', 'Eiffel Tower');
  await page.fill('#edit-target', '');
  out.empty_target = await click('#edit');
  await page.fill('#edit-target', 'Rome');
  out.digest_after_bad = await digest();
  // The ROME edit.
  out.rome = await click('#edit');
  out.rome_steps = await page.textContent('#edit-loss');
  out.rome_listed = await listed();
  out.rome_p_new = [Number(await page.getAttribute('#edit-result', 'data-p-new-before')), Number(await page.getAttribute('#edit-result', 'data-p-new-after'))];
  out.digest_edited = await digest();
  await page.setViewportSize({ width: 1440, height: 900 });
  await page.screenshot({ path: join(shots, 'edit-tab-desktop.png') });
  await page.setViewportSize({ width: 1400, height: 1600 });
  out.edited = await predict();
  await go('edit');
  const [dl] = await Promise.all([page.waitForEvent('download'), page.click('#edits button')]);
  out.download_name = dl.suggestedFilename();
  copyFileSync(await dl.path(), join(outDir, 'tab-edit.safetensors'));
  out.undo = await click('#undo');
  out.digest_undone = await digest();
  out.undone = await predict();
  // A garbage edit file, then the file `loci edit --save-edit` made natively.
  out.bad_edit = await upload('#upload-edit', garbage);
  out.other_edit = await upload('#upload-edit', otherEdit);
  out.other_edit_listed = await listed();
  out.native = await upload('#upload-edit', nativeEdit);
  out.native_listed = await listed();
  out.native_top = await predict();
  await click('#undo');
  // MEMIT of two facts at layers 1 and 2: layer 1's statistics come with the static build.
  await go('edit');
  await page.selectOption('#edit-method', 'memit');
  await page.fill('#edit-layer', '1,2');
  await page.fill('#edit-more', 'Michael Jordan plays the sport of | Michael Jordan | soccer');
  out.memit = await click('#edit');
  out.memit_held = await page.textContent('#stats-held');
  out.memit_facts = Number(await page.getAttribute('#memit-result', 'data-facts'));
  out.memit_label = await page.textContent('#edits p:last-child');
  await click('#undo');
  out.digest_memit_undone = await digest();
  // AlphaEdit of the same two facts (its null space as 30% of the trace: this random model's
  // spectrum has almost nothing below the paper's 2e-2), then EMMET at layer 2; both undone.
  await page.selectOption('#edit-method', 'alphaedit');
  await page.fill('#edit-null', '30%');
  out.alphaedit = await click('#edit');
  out.alphaedit_facts = Number(await page.getAttribute('#memit-result', 'data-facts'));
  out.alphaedit_label = await page.textContent('#edits p:last-child');
  await page.selectOption('#edit-method', 'emmet');
  await page.fill('#edit-layer', '2');
  out.emmet = await click('#edit');
  out.emmet_label = await page.textContent('#edits p:last-child');
  out.emmet_title = await page.textContent('#memit-result h3');
  await click('#undo');
  await click('#undo');
  out.digest_family_undone = await digest();
  // Constrained fine-tuning at layer 1 (no statistics needed), undone.
  await page.selectOption('#edit-method', 'ft');
  await page.fill('#edit-layer', '1');
  out.ft = await click('#edit');
  out.ft_label = await page.textContent('#edits p:last-child');
  await click('#undo');
  out.digest_ft_undone = await digest();
  // GRACE at layer 2: a codebook entry (in the digest, though no weight changes), undone.
  await page.selectOption('#edit-method', 'grace');
  await page.fill('#edit-layer', '2');
  out.grace = await click('#edit');
  out.grace_label = await page.textContent('#edits p:last-child');
  out.digest_grace = await digest();
  await click('#undo');
  out.digest_grace_undone = await digest();
  // Statistics from a URL (the build's own file, by its address).
  await page.fill('#stats-url', 'models/tiny-gptj/stats/layer1.safetensors');
  out.url_stats = await click('#stats-fetch');
  out.url_held = await page.textContent('#stats-held');
  // Hase et al.'s study of the fact in the tab: ROME at layers 1 and 2, the model unchanged.
  await go('study');
  out.study_badge = await page.getAttribute('.badge', 'data-engine');
  await page.fill('#study-true', 'Paris');
  await page.check('#study-all');
  await page.fill('#study-layers', '1,2');
  await page.click('#study');
  out.study = await finish();
  out.study_edits = Number(await page.getAttribute('#study-result', 'data-edits'));
  await go('edit');
  out.digest_study = await digest();
  // A sequential run's results file (from `loci eval --sequential`), read and drawn in the tab.
  await go('evaluate');
  await page.setInputFiles('#sequence-file', sequence);
  await page.waitForSelector('#sequence-run figure.chart svg', { timeout: 10000 });
  out.sequence_rows = await page.locator('#sequence-run tbody tr').count();
  out.sequence_chart = await page.innerHTML('#sequence-run figure.chart');
  // A shareable link of a trace (MLP only), opened in a new tab: it runs there.
  await go('trace');
  await page.uncheck('#kind-hidden');
  await page.uncheck('#kind-attn');
  const traceLink = await page.getAttribute('#copy-link', 'data-link');
  const tracePage = watch(await context.newPage(), 'trace link');
  await tracePage.goto(traceLink);
  // The result box stands empty while the model loads (the status is idle between loading
  // steps): wait for a drawn panel, then for the page to settle.
  await tracePage.waitForSelector('.heatmap figure.panel', { timeout: 120000 });
  await tracePage.waitForSelector('#status[data-busy="false"]', { timeout: 120000 });
  out.trace_link = traceLink;
  out.trace_linked = { status: await tracePage.textContent('#status'), engine: await tracePage.getAttribute('#trace-result', 'data-engine'), panels: await tracePage.locator('.heatmap figure.panel').count() };
  await tracePage.close();
  // Attribution patching in the tab: the whole grid from one backward pass.
  await page.selectOption('#trace-method', 'attribution');
  await page.click('#trace');
  out.attribution = await finish();
  out.attribution_panels = await page.locator('.heatmap figure.panel').count();
  // Knowledge neurons in the tab: integrated gradients over the MLP neurons.
  await page.selectOption('#trace-method', 'neurons');
  await page.click('#trace');
  out.neurons = await finish();
  out.neurons_panels = await page.locator('.heatmap figure.panel').count();
  await page.selectOption('#trace-method', 'exact');
  await go('edit');
  // A shareable link of the edit form, opened in a new tab: the same request, made there; the
  // statistics come from the browser's cache this time.
  await page.selectOption('#edit-method', 'rome');
  await page.fill('#edit-layer', '2');
  await page.click('#copy-link');
  out.link = await page.getAttribute('#copy-link', 'data-link');
  page = watch(await context.newPage(), 'linked page');
  await page.goto(out.link);
  await page.waitForSelector('#status[data-status="edited"], #status[data-status="error"]', { timeout: 300000 });
  await page.waitForSelector('#status[data-busy="false"]', { timeout: 300000 });
  out.linked = { kind: await page.getAttribute('#status', 'data-status'), text: await page.textContent('#status') };
  out.linked_form = [await page.inputValue('#edit-prompt'), await page.inputValue('#edit-subject'), await page.inputValue('#edit-target'), await page.inputValue('#edit-layer')];
  out.linked_stats = await page.textContent('#stats-held');
  out.linked_digest = await digest();
} catch (e) {
  errors.push(String(e));
  await page.screenshot({ path: join(outDir, 'failure.png'), fullPage: true }).catch(() => {});
}
console.log(JSON.stringify(out));
await browser.close();
