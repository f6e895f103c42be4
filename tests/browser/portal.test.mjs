// The portal in a real browser: headless Debian Chromium, driven by playwright-core, against a real
// rki-gateway and simulated terminals (rki-device-sim processes). Started by the Rust test
// `tests/tests/portal.rs`, which starts the gateway, authorizes the key sources (the key owner's
// job, done with rkictl, not in the portal), uploads one SN to a third organization, initech, and
// passes everything in the environment:
//
//   PORTAL_URL        http://127.0.0.1:PORT (the gateway's HTTP address)
//   ORG_TOKEN         acme's admin token; KEY_OWNER_TOKEN; OTHER_ORG_TOKEN (globex)
//   OTHER_KEY_SOURCE  the key source authorized to globex
//   KEY_SOURCE, KEY_SOURCE_KCV  acme's key source and its KCV
//   SECRET_TEXT       comma-separated strings that must never appear in the page (the BDK)
//   CHROMIUM          the browser executable; DEVICE_SIM the rki-device-sim binary; MQTT host:port
//   WORK_DIR          scratch directory; SCREENSHOT_DIR where the tab screenshots go
//
// Everything else is done through the page, as the provider (the key owner uploads acme's devices)
// and the fleet manager would; the test reads back only what the page shows.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`environment variable ${name} is not set (run this through cargo test --test portal)`);
  return value;
};

const URL_BASE = env('PORTAL_URL');
const ORG_TOKEN = env('ORG_TOKEN');
const OTHER_ORG_TOKEN = env('OTHER_ORG_TOKEN');
const OTHER_KEY_SOURCE = env('OTHER_KEY_SOURCE');
const KEY_OWNER_TOKEN = env('KEY_OWNER_TOKEN');
const KEY_SOURCE = env('KEY_SOURCE');
const KEY_SOURCE_KCV = env('KEY_SOURCE_KCV');
const SECRET_TEXT = env('SECRET_TEXT').split(',');
const CHROMIUM = env('CHROMIUM');
const DEVICE_SIM = env('DEVICE_SIM');
const MQTT = env('MQTT');
const WORK_DIR = env('WORK_DIR');
const SCREENSHOT_DIR = env('SCREENSHOT_DIR');

/** How long the page may take to show something that the gateway does at once. */
const SHOWN_MS = 20000;
/** Delay of the simulated terminals' acks: long enough to see a task in progress, and its
 * devices `delivered` over more than one of the page's 1.5 s polls (the gateway writes a send as
 * delivered once it has gone a second without an ack). */
const ACK_DELAY_MS = 5000;

mkdirSync(SCREENSHOT_DIR, { recursive: true });
mkdirSync(WORK_DIR, { recursive: true });

const children = [];
let browser;
let page;
let currentStep = 'start';

function log(text) {
  process.stderr.write(`[portal test] ${text}\n`);
}

async function step(name, body) {
  currentStep = name;
  const started = Date.now();
  await body();
  log(`ok  ${name} (${Date.now() - started} ms)`);
}

/** Retries `check` until it passes or `ms` elapse; the last failure is the error. */
async function eventually(check, ms = SHOWN_MS) {
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      return await check();
    } catch (e) {
      if (Date.now() > deadline) throw e;
      await new Promise((r) => setTimeout(r, 200));
    }
  }
}

/** What the operator reads: the rendered text, cells apart, whitespace collapsed. */
const text = async (locator) => ((await locator.innerText()) || '').replace(/\s+/g, ' ').trim();

async function shot(name) {
  // A steady picture: no caret, no running animation.
  await page.screenshot({ path: path.join(SCREENSHOT_DIR, `${name}.png`), fullPage: true, animations: 'disabled', caret: 'hide' });
}

/** The status line says `pattern`. */
async function status(pattern, ms = SHOWN_MS) {
  await eventually(async () => {
    const t = await text(page.locator('#status'));
    assert.match(t, pattern, `status line: ${t}`);
  }, ms);
}

async function tab(name) {
  await page.getByRole('tab', { name, exact: true }).click();
  await eventually(async () => assert.equal(await page.getByRole('tab', { name, exact: true }).getAttribute('aria-selected'), 'true'));
}

/** The cells of the table body row whose key (SN, task id…) is `key`. */
async function rowText(table, key) {
  return text(page.locator(`${table} [data-key="${key}"]`));
}

function startSim(label, lines, extra) {
  const csv = path.join(WORK_DIR, `${label}.csv`);
  writeFileSync(csv, `${lines.join('\n')}\n`);
  const args = ['run', '--csv', csv, '--broker', MQTT, ...extra];
  const child = spawn(DEVICE_SIM, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr.on('data', (d) => {
    err = (err + d).slice(-4000);
  });
  child.exited = new Promise((resolve) => child.on('exit', (code) => resolve(code)));
  child.lastError = () => err;
  children.push(child);
  log(`started rki-device-sim ${label}: ${args.join(' ')}`);
  return child;
}

async function main() {
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    // Chromium's own background traffic is refused by this machine's closed network.
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
  });
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, acceptDownloads: true, locale: 'en-GB', timezoneId: 'UTC' });
  page = await context.newPage();
  page.setDefaultTimeout(SHOWN_MS);

  // Script errors and CSP refusals fail the test; refused API calls (401, 422…) are expected.
  const problems = [];
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) problems.push(`console: ${m.text()}`);
  });

  const acme = { gudids: new Map() };

  await step('the portal opens at /portal with a sign-in form', async () => {
    await page.goto(`${URL_BASE}/portal`);
    assert.equal(new URL(page.url()).pathname, '/portal/');
    await page.getByRole('heading', { name: 'Sign in' }).waitFor();
    await shot('signin');
  });

  await step('a wrong token is refused with a reason', async () => {
    await page.getByLabel('Token').fill('not-a-token');
    await page.getByRole('button', { name: 'Sign in' }).click();
    await eventually(async () => assert.equal(await text(page.locator('#signin-error')), 'This token is not valid.'));
    assert.equal(await page.locator('#app').isHidden(), true);
    assert.equal(await page.locator('#provider').isHidden(), true);
  });

  await step('the key owner signs in to the provider view: organizations to upload to, no fleet', async () => {
    await page.getByLabel('Token').fill(KEY_OWNER_TOKEN);
    await page.getByLabel('Token').press('Enter');
    await page.getByRole('heading', { name: 'Upload devices to an organization' }).waitFor();
    assert.equal(await text(page.locator('#who')), 'Key owner (provider)');
    assert.equal(await page.locator('#app').isHidden(), true, "the organization's tabs are shown to the key owner");
    assert.ok(!page.url().includes(KEY_OWNER_TOKEN), page.url());
    await eventually(async () => assert.deepEqual(
      await page.locator('#upload-org option').allTextContents(), ['acme', 'globex', 'initech']));
  });

  await step('a CSV with a bad line and an SN held by another organization is refused line by line', async () => {
    const csv = 'sn,model\nSHOP001,P3\nSHOP002,P3\nSHOP 003,P3\nSHOP004,P3\nSHOP005,P3\nHELD001,P3\n';
    await page.getByLabel('Organization', { exact: true }).selectOption('acme');
    await page.getByLabel('CSV file').setInputFiles({ name: 'fleet.csv', mimeType: 'text/csv', buffer: Buffer.from(csv) });
    await eventually(async () => assert.equal(await page.getByLabel('or paste the lines').inputValue(), csv));
    await page.getByRole('button', { name: 'Check file' }).click();
    const bad = page.locator('#upload-errors tbody tr');
    await eventually(async () => assert.equal(await bad.count(), 2));
    assert.equal(await bad.nth(0).getAttribute('data-line'), '4');
    assert.match(await text(bad.nth(0)), /^4 SHOP 003 invalid SN/);
    assert.equal(await bad.nth(1).getAttribute('data-line'), '7');
    assert.equal(await text(bad.nth(1)), '7 HELD001 SN is held by another organization (initech)');
    assert.match(await text(page.locator('#upload-errors h4')), /2 problem line\(s\); nothing was uploaded to acme/);
    assert.equal(await page.locator('#upload-run').isDisabled(), true);
    await shot('provider-upload-errors');
  });

  await step('the fixed CSV is checked for one organization, then uploaded to it', async () => {
    const fixed = 'sn,model\nSHOP001,P3\nSHOP002,P3\nSHOP003,P3\nSHOP004,P3\nSHOP005,P3\nSPARE001,P3\n';
    await page.getByLabel('or paste the lines').fill(fixed);
    await page.getByRole('button', { name: 'Check file' }).click();
    // Six new: the refused file stored nothing.
    await eventually(async () => assert.equal(await text(page.locator('#upload-ok')),
      '6 valid device line(s) for acme: 6 new, 0 already registered. Nothing has been uploaded yet.'));
    // A check holds for the organization it was made for.
    await page.getByLabel('Organization', { exact: true }).selectOption('globex');
    assert.equal(await page.locator('#upload-run').isDisabled(), true);
    await page.getByLabel('Organization', { exact: true }).selectOption('acme');
    await page.getByRole('button', { name: 'Check file' }).click();
    await page.getByRole('button', { name: 'Upload 6 device(s) to acme' }).click();
    await status(/Uploaded 6 new device\(s\) to acme; 0 already registered\./);
    assert.equal(await page.getByLabel('or paste the lines').inputValue(), '');
    await shot('provider');
    await page.getByRole('button', { name: 'Sign out' }).click();
    await page.getByLabel('Token').waitFor();
    assert.equal(await page.evaluate(() => sessionStorage.getItem('rki.portal.token')), null);
  });

  await step('the organization signs in; the token stays out of the URL and out of localStorage', async () => {
    await page.getByLabel('Token').fill(ORG_TOKEN);
    await page.getByLabel('Token').press('Enter');
    await page.getByRole('tab', { name: 'Devices' }).waitFor();
    assert.ok(!page.url().includes(ORG_TOKEN), page.url());
    assert.equal(await page.evaluate(() => localStorage.length), 0);
    assert.equal(await page.evaluate(() => sessionStorage.getItem('rki.portal.token')), ORG_TOKEN);
    assert.equal(await page.locator('#provider').isHidden(), true);
  });
  // A mark on this page's window: a reload would wipe it.
  const notReloaded = async () => assert.equal(await page.evaluate(() => window.portalTestMark), 'still the same page', 'the page was reloaded');
  await page.evaluate(() => {
    window.portalTestMark = 'still the same page';
  });

  await step('key management shows the key source with its KCV, never a key', async () => {
    await tab('Key management');
    await eventually(async () => {
      const row = await rowText('#keys-table', KEY_SOURCE);
      assert.match(row, new RegExp(`^${KEY_SOURCE} TDES2 ${KEY_SOURCE_KCV} [0-9A-F]{10} `));
    });
    await shot('keys');
  });

  await step('tabs answer the arrow keys', async () => {
    await page.getByRole('tab', { name: 'Key management' }).focus();
    await page.keyboard.press('ArrowLeft');
    await eventually(async () => assert.equal(await page.getByRole('tab', { name: 'Devices' }).getAttribute('aria-selected'), 'true'));
    assert.equal(await page.evaluate(() => document.activeElement.id), 'tab-devices');
  });

  await step('the uploaded devices are listed; the organization has no import of its own', async () => {
    await eventually(async () => assert.equal(await page.locator('#devices-table tbody tr[data-key]').count(), 6));
    assert.equal(await page.locator('#import-form, #upload-form:visible').count(), 0);
    assert.equal(await page.getByLabel('CSV file').isVisible(), false);
  });

  await step('a group is created and filled with the uploaded devices by SN', async () => {
    await page.getByLabel('Name', { exact: true }).fill('shop');
    await page.getByLabel('Description (optional)').fill('devices of the shop floor');
    await page.getByRole('button', { name: 'Create group' }).click();
    await status(/Group shop created/);
    await eventually(async () => assert.match(await rowText('#groups-table', 'shop'), /shop devices of the shop floor 0/));
    await page.locator('#group-add-group').selectOption('shop');
    await page.locator('#group-add-sns').fill('SHOP001\nSHOP002, SHOP003\nSHOP004 SHOP005');
    await page.getByRole('button', { name: 'Add to group' }).click();
    await status(/Group shop: 5 device\(s\) added \(5 named\)/);
    await eventually(async () => assert.match(await rowText('#groups-table', 'shop'), /shop devices of the shop floor 5/));
  });

  await step("adding an SN the organization was not given is refused; an uploaded one is added", async () => {
    await page.getByLabel('Name', { exact: true }).fill('lab');
    await page.getByRole('button', { name: 'Create group' }).click();
    await status(/Group lab created/);
    await page.locator('#group-add-group').selectOption('lab');
    // HELD001 is another organization's: refused exactly like an SN that does not exist.
    await page.locator('#group-add-sns').fill('HELD001');
    await page.getByRole('button', { name: 'Add to group' }).click();
    await eventually(async () => {
      assert.equal(await text(page.locator('#status')), 'unknown SN(s): HELD001');
      assert.equal(await page.locator('#status').getAttribute('class'), 'status error');
    });
    await page.locator('#group-add-sns').fill('SPARE001');
    await page.getByRole('button', { name: 'Add to group' }).click();
    await status(/Group lab: 1 device\(s\) added/);
    await eventually(async () => assert.match(await rowText('#groups-table', 'lab'), /lab — 1/));
  });

  await step('GUDIDs are provisioned and shown once', async () => {
    await tab('GUDIDs');
    await page.locator('#gudid-sns').fill('SHOP001\nSHOP002\nSHOP003\nSHOP005\nSPARE001');
    await page.getByRole('button', { name: 'Provision GUDID' }).click();
    await status(/5 GUDID\(s\) provisioned/);
    for (const row of await page.locator('#gudid-fresh-table tbody tr').all()) {
      acme.gudids.set(await row.getAttribute('data-sn'), await text(row.locator('td.gudid')));
    }
    assert.deepEqual([...acme.gudids.keys()].sort(), ['SHOP001', 'SHOP002', 'SHOP003', 'SHOP005', 'SPARE001']);
    await eventually(async () => assert.equal(await page.locator('#gudids-table tbody tr[data-status="unused"]').count(), 5));
    await shot('gudids');
    await page.getByRole('button', { name: 'I have copied them: hide' }).click();
    assert.equal(await page.locator('#gudid-fresh').isHidden(), true);
    assert.equal(await page.locator('#gudid-fresh-table tbody tr').count(), 0);
  });

  // The terminals: two that install the key, one that fails it with -1 (key record not found), one
  // in debug mode (not ready: -3000 would follow), and a spare that says hello and powers off.
  const g = (sn) => `${sn},${acme.gudids.get(sn)}`;
  const slow = ['--ack-delay-ms', String(ACK_DELAY_MS)];
  const good = startSim('good', [g('SHOP001'), g('SHOP002')], slow);
  const failing = startSim('failing', [g('SHOP003')], [...slow, '--fail-fraction', '1', '--fail-code', '-1']);
  const debug = startSim('debug', [g('SHOP005')], ['--fail-fraction', '1', '--fail-code', '-3000']);
  const spare = startSim('spare', [g('SPARE001')], ['--duration-s', '4']);

  await step('the terminals initialise: their GUDIDs are used', async () => {
    await eventually(async () => {
      await page.getByRole('button', { name: 'Filter' }).click();
      assert.equal(await page.locator('#gudids-table tbody tr[data-status="used"]').count(), 5);
    }, 60000);
    await page.locator('#gudid-filter-status').selectOption('used');
    await eventually(async () => assert.equal(await page.locator('#gudids-table tbody tr[data-key]').count(), 5));
    await page.locator('#gudid-filter-status').selectOption('');
  });

  await step('the device table shows connection, firmware, lock, assignment and task, live', async () => {
    assert.equal(await spare.exited, 0, `spare terminal: ${spare.lastError()}`);
    await tab('Devices');
    await page.locator('#device-group').selectOption('');
    await eventually(async () => {
      for (const sn of ['SHOP001', 'SHOP002', 'SHOP003', 'SHOP005']) {
        assert.match(await rowText('#devices-table', sn), new RegExp(`^${sn} P3 3\\.0\\.15 2\\.0\\.0 online last seen .* ready unassigned none$`));
      }
      assert.match(await rowText('#devices-table', 'SHOP004'), /^SHOP004 P3 — — offline never seen not initialised ready unassigned none$/);
      assert.match(await rowText('#devices-table', 'SPARE001'), /^SPARE001 P3 3\.0\.15 2\.0\.0 offline last seen/);
    }, 30000);
    assert.match(await text(page.locator('#device-count')), /6 shown of 6 device\(s\)/);
    await shot('devices');
    await page.getByLabel('Search by SN').fill('SPARE');
    await page.getByRole('button', { name: 'Search' }).click();
    await eventually(async () => assert.equal(await page.locator('#devices-table tbody tr[data-key]').count(), 1));
    await page.getByLabel('Search by SN').fill('');
    await page.getByRole('button', { name: 'Search' }).click();
  });

  await step('a key source is assigned to a group and to one device', async () => {
    await tab('Key assignment');
    await page.locator('#assign-group').selectOption('shop');
    await page.locator('#assign-key').selectOption(KEY_SOURCE);
    await page.getByRole('button', { name: 'Assign key', exact: true }).click();
    await status(new RegExp(`Assigned ${KEY_SOURCE} to 5 device\\(s\\) \\(group shop\\)`));
    await page.getByRole('button', { name: 'Assign a key to SPARE001' }).click();
    assert.equal(await page.locator('#assign-sns').inputValue(), 'SPARE001');
    assert.equal(await page.evaluate(() => document.activeElement.id), 'assign-key');
    await page.locator('#assign-key').selectOption(KEY_SOURCE);
    await page.getByRole('button', { name: 'Assign key', exact: true }).click();
    await status(new RegExp(`Assigned ${KEY_SOURCE} to 1 device\\(s\\) \\(SPARE001\\)`));
    await eventually(async () => assert.match(await rowText('#assign-table', 'SPARE001'), new RegExp(`SPARE001 P3 ${KEY_SOURCE} ready none`)));
    await shot('assign');
  });

  await step('the preview of a group task shows who is ready and why the others are not', async () => {
    await tab('Download tasks');
    await page.locator('#create-task summary').click();
    await page.locator('#task-group').selectOption('shop');
    await page.getByRole('button', { name: 'Preview' }).click();
    await eventually(async () => assert.match(await text(page.locator('#preview-ready')), /^Ready: 3 — SHOP001, SHOP002, SHOP003$/));
    assert.match(await text(page.locator('#preview-not-ready')), /SHOP004 not initialised:? .*never seen:? .*SHOP005 debug key present/);
    await shot('task-preview');
  });

  await step('the task is created and its progress shows live until it is done', async () => {
    await page.getByRole('button', { name: 'Create task for 3 device(s)' }).click();
    await status(/Task #1 created for 3 device\(s\)/);
    // In progress first (the terminals ack after a delay), in the Unfinished tab, expanded.
    await eventually(async () => assert.match(await text(page.locator('tbody.task[data-task="1"]')), /in progress/), 5000);
    await eventually(async () => assert.match(await text(page.locator('#task-1-devices')), /SHOP001 delivered online/));
    await shot('task-running');
    // Then done, without a reload: the page announces it and the dashboard counts it.
    await status(/Task #1 is done: finished with failures \(2 succeeded · 1 failed\)/, 30000);
    await eventually(async () => assert.equal(await page.locator('tbody.task[data-task="1"]').count(), 0));
    const dash = async (name) => text(page.locator(`#dashboard [data-count="${name}"]`));
    await eventually(async () => assert.deepEqual(
      [await dash('unfinished'), await dash('done'), await dash('succeeded'), await dash('failed')], ['0', '1', '2', '1']));
    await notReloaded();
  });

  await step('the Done tab shows each device with its state and error code meaning', async () => {
    await page.getByRole('tab', { name: 'Done' }).click();
    const task = page.locator('tbody.task[data-task="1"]');
    await eventually(async () => assert.equal(await task.getAttribute('data-outcome'), 'finished with failures'));
    await eventually(async () => {
      const devices = page.locator('#task-1-devices');
      assert.match(await text(devices.locator('tr[data-sn="SHOP001"]')), /^SHOP001 succeeded online 1 — — [0-9A-F]{20} [0-9A-F]{6}/);
      assert.match(await text(devices.locator('tr[data-sn="SHOP003"]')), /^SHOP003 failed online 1 -1 key record not found/);
    });
  });

  await step('a second task, for one offline device, is stopped and shows "manually terminated"', async () => {
    await page.getByLabel('devices by SN').last().check();
    await page.locator('#task-sns').fill('SPARE001');
    await page.getByRole('button', { name: 'Preview' }).click();
    await eventually(async () => assert.match(await text(page.locator('#preview-ready')), /^Ready: 1 — SPARE001$/));
    await page.getByRole('button', { name: 'Create task for 1 device(s)' }).click();
    await status(/Task #2 created for 1 device\(s\)/);
    const task = page.locator('tbody.task[data-task="2"]');
    await eventually(async () => assert.match(await text(task), /in progress/));
    // Stop asks first; Cancel changes nothing.
    await page.getByRole('button', { name: 'Stop task 2' }).click();
    const dialog = page.getByRole('dialog', { name: 'Stop task #2?' });
    await dialog.waitFor();
    assert.match(await text(dialog), /1 open execution\(s\) will be terminated/);
    await dialog.getByRole('button', { name: 'Cancel' }).click();
    await page.waitForTimeout(2 * 1500);
    assert.match(await text(task), /in progress/);
    await page.getByRole('button', { name: 'Stop task 2' }).click();
    await dialog.getByRole('button', { name: 'Stop task' }).click();
    await status(/Task #2 stopped: 1 execution\(s\) terminated \(manually terminated\)/);
    await page.getByRole('tab', { name: 'Done' }).click();
    await eventually(async () => assert.equal(await page.locator('tbody.task[data-task="2"]').getAttribute('data-outcome'), 'manually terminated'));
    // A new task opens expanded; its devices stay shown in the Done tab.
    assert.equal(await page.locator('tbody.task[data-task="2"]').getByRole('button', { name: 'Hide devices' }).getAttribute('aria-expanded'), 'true');
    await eventually(async () => assert.match(await text(page.locator('#task-2-devices')), /SPARE001 terminated \(manually\) offline 0/));
    await eventually(async () => assert.equal(await text(page.locator('#dashboard [data-count="terminated"]')), '1'));
    await page.locator('#create-task summary').click();
    await page.locator('#tasks-table').scrollIntoViewIfNeeded();
    await shot('tasks');
  });

  await step('the records show every ending, the key derivation record, the CSV and the billing', async () => {
    await tab('Download records');
    const rows = page.locator('#records-table tbody tr[data-key]');
    await eventually(async () => assert.equal(await rows.count(), 4));
    assert.match(await text(page.locator('#records-table tr[data-sn="SHOP001"]')), new RegExp(`SHOP001 ${KEY_SOURCE} IPEK auto succeeded [0-9A-F]{6}`));
    assert.match(await text(page.locator('#records-table tr[data-sn="SHOP003"]')), /SHOP003 .* IPEK auto failed -1: key record not found/);
    assert.match(await text(page.locator('#records-table tr[data-sn="SPARE001"]')), /SPARE001 .* manually terminated/);
    await eventually(async () => assert.match(await text(page.locator('#billing-table tbody')), new RegExp(`^\\d{4}-\\d{2} ${KEY_SOURCE} 2$`)));
    await shot('records');

    await page.getByRole('button', { name: 'View key derivation record of SHOP001' }).click();
    const dialog = page.getByRole('dialog', { name: 'Key derivation record' });
    await dialog.waitFor();
    const ksn = await text(dialog.locator('dd[data-fact="Key ID (KSN)"]'));
    assert.match(ksn, /^[0-9A-F]{20}$/);
    await shot('derivation');
    await page.keyboard.press('Escape');
    await eventually(async () => assert.equal(await dialog.isVisible(), false));
    assert.equal(await page.evaluate(() => document.activeElement.getAttribute('aria-label')), 'View key derivation record of SHOP001', 'focus returns to the button');

    const [download] = await Promise.all([page.waitForEvent('download'), page.getByRole('button', { name: 'Export CSV' }).click()]);
    assert.equal(download.suggestedFilename(), 'download-records.csv');
    const csv = readFileSync(await download.path(), 'utf8').trim().split('\n');
    assert.match(csv[0], /^sn,key_source,key_type,injection,result,error_code/);
    assert.equal(csv.length, 5, csv.join('\n'));
    assert.ok(csv.some((l) => l.startsWith('SHOP001,') && l.includes(ksn)), 'the CSV has the KSN the page shows');

    await page.locator('#records-sn').fill('SHOP003');
    await page.getByRole('button', { name: 'Filter' }).click();
    await eventually(async () => assert.equal(await rows.count(), 1));

    // From a done task straight to its records.
    await tab('Download tasks');
    await page.getByRole('tab', { name: 'Done' }).click();
    await page.getByRole('button', { name: 'Records of task 1' }).click();
    await eventually(async () => assert.equal(await page.getByRole('tab', { name: 'Download records' }).getAttribute('aria-selected'), 'true'));
    assert.equal(await page.locator('#records-task').inputValue(), '1');
    await eventually(async () => assert.equal(await rows.count(), 3));
  });

  await step('no secret ever reached the page', async () => {
    const html = await page.content();
    for (const secret of SECRET_TEXT) assert.ok(!html.includes(secret), 'a key is in the page');
  });

  await step("another organization's token sees none of the first one's objects", async () => {
    await page.getByRole('button', { name: 'Sign out' }).click();
    await page.getByLabel('Token').waitFor();
    assert.equal(await page.evaluate(() => sessionStorage.getItem('rki.portal.token')), null);
    await page.getByLabel('Token').fill(OTHER_ORG_TOKEN);
    await page.getByRole('button', { name: 'Sign in' }).click();
    await tab('Devices');
    await eventually(async () => assert.equal(await text(page.locator('#devices-table tbody')),
      'No device yet: your devices come from your provider, who uploads them to the portal.'));
    await eventually(async () => assert.match(await text(page.locator('#groups-table tbody')), /^No group yet/));
    await eventually(async () => assert.match(await text(page.locator('#device-count')), /0 shown of 0 device/));
    await page.getByLabel('Search by SN').fill('SHOP001');
    await page.getByRole('button', { name: 'Search' }).click();
    await eventually(async () => assert.match(await text(page.locator('#devices-table tbody')), /^No device matches/));
    await shot('other-organization');
    await tab('Key management');
    await eventually(async () => assert.equal(await page.locator('#keys-table tbody tr[data-key]').count(), 1));
    assert.match(await rowText('#keys-table', OTHER_KEY_SOURCE), new RegExp(OTHER_KEY_SOURCE));
    await tab('Download tasks');
    for (const name of ['unfinished', 'done', 'succeeded', 'failed', 'expired', 'terminated']) {
      await eventually(async () => assert.equal(await text(page.locator(`#dashboard [data-count="${name}"]`)), '0'));
    }
    for (const which of ['Unfinished', 'Done']) {
      await page.getByRole('tab', { name: which }).click();
      await eventually(async () => assert.equal(await page.locator('#tasks-empty').isVisible(), true));
      assert.equal(await page.locator('tbody.task').count(), 0);
    }
    await tab('Download records');
    await eventually(async () => assert.match(await text(page.locator('#records-table tbody')), /^No record/));
    // The billing table is a request of its own: it may render after the records table.
    await eventually(async () => assert.match(await text(page.locator('#billing-table tbody')), /^No key injected yet/));
    await tab('GUDIDs');
    await eventually(async () => assert.match(await text(page.locator('#gudids-table tbody')), /^No GUDID/));
    // Acting on the first organization's objects by name fails like an unknown name.
    await tab('Key assignment');
    await page.getByLabel('devices by SN').first().check();
    await page.locator('#assign-sns').fill('SHOP001');
    await page.getByRole('button', { name: 'Assign key', exact: true }).click();
    await eventually(async () => assert.equal(await page.locator('#status').getAttribute('class'), 'status error'));
  });

  assert.deepEqual(problems, [], 'the page logged errors');
}

let failed = false;
try {
  await main();
  log('all steps passed');
} catch (e) {
  failed = true;
  log(`FAILED at step "${currentStep}": ${e.stack || e}`);
  if (page) {
    const file = path.join(WORK_DIR, 'failure.png');
    await page.screenshot({ path: file, fullPage: true }).catch(() => {});
    log(`screenshot of the failure: ${file}`);
    log(`status line: ${await text(page.locator('#status')).catch(() => '?')}`);
  }
  for (const c of children) if (c.lastError()) log(`rki-device-sim stderr: ${c.lastError().slice(-800)}`);
} finally {
  if (browser) await browser.close().catch(() => {});
  for (const c of children) if (c.exitCode === null) c.kill('SIGINT');
  await Promise.all(children.map((c) => c.exited));
}
process.exit(failed ? 1 : 0);
