// RKI portal: the fleet manager's page over the gateway's `/v1` admin API, and the key owner's
// (the provider's) page for uploading each organization's devices.
//
// Every fact shown comes from the API, and every action is one API call: the page holds no rule of
// its own (readiness, outcomes, meanings and counts are the API's). The token (an organization's,
// or the key owner's) lives in sessionStorage (this tab only) and travels only in the
// Authorization header, never in a URL.
// Untrusted text is only ever put in the page as text (`textContent`), never as HTML.
'use strict';

(() => {
  /** sessionStorage key of the token: gone when the tab closes. */
  const TOKEN_KEY = 'rki.portal.token';
  /** Refresh period of the task list and dashboard while the tasks tab is shown. */
  const TASK_POLL_MS = 1500;
  /** Refresh period of the device tables while a device tab is shown. */
  const DEVICE_POLL_MS = 3000;
  /** Devices fetched per page of the device tables. */
  const DEVICE_PAGE = 500;
  /** Records per page. */
  const RECORDS_PAGE = 50;
  /** Tasks listed per tab. */
  const TASKS_MAX = 200;
  /** Expanded tasks refreshed on each poll, at most. */
  const EXPANDED_MAX = 5;
  /** Devices listed under an expanded task (a fleet-wide task has far more). */
  const DEVICES_SHOWN_MAX = 1000;
  /** A success message disappears after this long; errors stay until the next message. */
  const STATUS_OK_MS = 12000;

  const $ = (selector, root = document) => root.querySelector(selector);
  const $$ = (selector, root = document) => Array.from(root.querySelectorAll(selector));

  /** Builds an element: `h('td', {class: 'num'}, 'text', child)`. Strings become text nodes. */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === 'class') el.className = value;
      else if (name.startsWith('on')) el.addEventListener(name.slice(2), value);
      else if (name === 'dataset') Object.assign(el.dataset, value);
      else el.setAttribute(name, value === true ? '' : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  const badge = (kind, text) => h('span', { class: `badge ${kind}` }, text);
  const mono = (text) => h('span', { class: 'mono' }, text === null || text === undefined || text === '' ? '—' : text);
  const dash = (value) => (value === null || value === undefined || value === '' ? '—' : String(value));

  function pad(n) {
    return String(n).padStart(2, '0');
  }

  /** Milliseconds since the epoch → local `YYYY-MM-DD HH:MM:SS`. */
  function fmtTime(ms) {
    if (ms === null || ms === undefined) return '—';
    const d = new Date(ms);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function ago(ms) {
    const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
    if (s < 60) return `${s} s ago`;
    if (s < 3600) return `${Math.round(s / 60)} min ago`;
    if (s < 86400) return `${Math.round(s / 3600)} h ago`;
    return `${Math.round(s / 86400)} days ago`;
  }

  /** A relative time that [`refreshAgo`] keeps current without rebuilding its row. */
  const agoSpan = (ms) => h('span', { dataset: { ago: String(ms) }, title: fmtTime(ms) }, ago(ms));
  function refreshAgo(root) {
    for (const el of $$('[data-ago]', root)) el.textContent = ago(Number(el.dataset.ago));
  }

  /** SNs typed in a text area: one per line, or separated by commas, semicolons or spaces. */
  function parseSns(text) {
    return text.split(/[\s,;]+/).map((s) => s.trim()).filter(Boolean);
  }

  /** Makes a readable label of an API code: `task_pending` → `task pending`. */
  const humanize = (code) => String(code).replace(/_/g, ' ');

  // ------------------------------------------------------------------ the API

  let token = sessionStorage.getItem(TOKEN_KEY);

  class ApiError extends Error {
    constructor(status, problem) {
      const detail = problem && typeof problem === 'object' ? problem.detail : null;
      super(detail || (typeof problem === 'string' && problem) || `the gateway answered HTTP ${status}`);
      this.status = status;
      this.problem = problem && typeof problem === 'object' ? problem : {};
    }
  }

  /** One call to the admin API. A string body is sent as CSV, anything else as JSON. */
  async function api(method, path, body, tokenOverride) {
    const headers = { Authorization: `Bearer ${tokenOverride || token}`, Accept: 'application/json' };
    let payload;
    if (typeof body === 'string') {
      headers['Content-Type'] = 'text/csv';
      payload = body;
    } else if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      payload = JSON.stringify(body);
    }
    let res;
    try {
      res = await fetch(path, { method, headers, body: payload, cache: 'no-store', credentials: 'omit' });
    } catch (e) {
      throw new ApiError(0, 'the gateway cannot be reached');
    }
    const type = res.headers.get('content-type') || '';
    const data = type.includes('json') ? await res.json().catch(() => null) : await res.text();
    if (!res.ok) {
      if (res.status === 401 && !tokenOverride && token) {
        signOut('The gateway no longer accepts this token: sign in again.');
      }
      throw new ApiError(res.status, data);
    }
    return data;
  }

  /** `?a=1&b=2` from the non-empty values. */
  function query(params) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) {
      if (v !== null && v !== undefined && v !== '') q.set(k, String(v));
    }
    const s = q.toString();
    return s ? `?${s}` : '';
  }

  // ------------------------------------------------------------------ messages

  let statusTimer = null;
  function say(text, isError = false) {
    const el = $('#status');
    clearTimeout(statusTimer);
    el.textContent = text;
    el.classList.toggle('error', isError);
    el.hidden = false;
    if (!isError) statusTimer = setTimeout(() => (el.hidden = true), STATUS_OK_MS);
  }

  /** Runs an action; any failure is shown, never swallowed. */
  async function run(action, button) {
    if (button) button.disabled = true;
    try {
      await action();
    } catch (e) {
      say(e instanceof ApiError ? e.message : `Unexpected error: ${e.message}`, true);
    } finally {
      if (button) button.disabled = false;
    }
  }

  /** Opens a modal dialog; when it closes, the focus returns to where it was. */
  function openDialog(dialog) {
    const before = document.activeElement;
    dialog.addEventListener('close', () => {
      if (before && before.isConnected) before.focus();
    }, { once: true });
    dialog.showModal();
  }

  /** A modal confirmation; resolves to true only if the operator confirms (Esc cancels). */
  function confirmAction(title, text, okLabel) {
    const dialog = $('#confirm');
    $('#confirm-title').textContent = title;
    $('#confirm-text').textContent = text;
    $('#confirm-ok').textContent = okLabel;
    dialog.returnValue = '';
    return new Promise((resolve) => {
      dialog.addEventListener('close', () => resolve(dialog.returnValue === 'ok'), { once: true });
      openDialog(dialog);
    });
  }

  // ------------------------------------------------------------------ keyed tables

  /**
   * Renders `items` into `container` keeping one element per key: an element is rebuilt only when
   * its signature changed and moved only when the order changed, so polling does not steal the
   * keyboard focus or the scroll position. Focus inside a rebuilt element returns to the control
   * with the same `data-focus` name.
   */
  function renderKeyed(container, items, { key, sig, build, empty }) {
    const old = container._keyed || new Map();
    const next = new Map();
    for (const item of items) {
      const k = String(key(item));
      const s = sig(item);
      let entry = old.get(k);
      if (!entry || entry.sig !== s) {
        const el = build(item);
        el.dataset.key = k;
        if (entry) {
          const active = document.activeElement;
          const focusName = entry.el.contains(active) && active.dataset ? active.dataset.focus : null;
          entry.el.replaceWith(el);
          if (focusName) {
            const again = el.querySelector(`[data-focus="${focusName}"]`);
            if (again) again.focus();
          }
        }
        entry = { el, sig: s };
      }
      next.set(k, entry);
    }
    for (const [k, entry] of old) if (!next.has(k)) entry.el.remove();
    const wanted = [...next.values()].map((e) => e.el);
    for (let i = wanted.length - 1; i >= 0; i--) {
      const after = wanted[i + 1] || null;
      const el = wanted[i];
      if (el.parentNode !== container || el.nextElementSibling !== after) {
        container.insertBefore(el, after || (container._emptyRow && container._emptyRow.parentNode ? container._emptyRow : null));
      }
    }
    container._keyed = next;
    if (empty) empty(items.length === 0);
  }

  /** The "nothing here" row of a table body. */
  function emptyRow(tbody, text) {
    return (isEmpty) => {
      if (!tbody._emptyRow) {
        const columns = tbody.closest('table').querySelectorAll('thead th').length;
        tbody._emptyRow = h('tr', {}, h('td', { class: 'empty', colspan: columns }, text));
      }
      tbody._emptyRow.querySelector('td').textContent = text;
      if (isEmpty) tbody.append(tbody._emptyRow);
      else tbody._emptyRow.remove();
    };
  }

  function clearKeyed(container) {
    container._keyed = new Map();
    container.replaceChildren();
  }

  // ------------------------------------------------------------------ shared lists: groups, key sources

  let groups = [];
  let keySources = [];
  let groupsSig = '';
  let keysSig = '';

  /** Fills every `<select data-groups>`; keeps each one's selection. */
  function fillGroupSelects() {
    for (const select of $$('select[data-groups]')) {
      const kind = select.dataset.groups;
      const keep = select.value;
      const options = [];
      if (kind === 'all') options.push(h('option', { value: '' }, 'All devices'));
      if (kind === 'none') options.push(h('option', { value: '' }, '— no group —'));
      if (kind === 'pick' && groups.length === 0) options.push(h('option', { value: '' }, 'No group yet'));
      for (const g of groups) options.push(h('option', { value: g.name }, `${g.name} (${g.members})`));
      select.replaceChildren(...options);
      if ([...select.options].some((o) => o.value === keep)) select.value = keep;
    }
  }

  function fillKeySelects() {
    for (const select of $$('select[data-keys]')) {
      const kind = select.dataset.keys;
      const keep = select.value;
      const options = [];
      if (kind === 'assigned') options.push(h('option', { value: '' }, "the devices' assigned key source"));
      for (const k of keySources) options.push(h('option', { value: k.name }, `${k.name} (${k.algorithm.toUpperCase()}, KCV ${k.kcv})`));
      if (kind === 'unassign') options.push(h('option', { value: '' }, '— remove the assignment —'));
      select.replaceChildren(...options);
      if (keep !== '' && [...select.options].some((o) => o.value === keep)) select.value = keep;
    }
  }

  async function loadGroups() {
    const data = await api('GET', '/v1/groups');
    groups = data.groups || [];
    const sig = JSON.stringify(groups.map((g) => [g.name, g.members]));
    if (sig !== groupsSig) {
      groupsSig = sig;
      fillGroupSelects();
    }
    renderKeyed($('#groups-table tbody'), groups, {
      key: (g) => g.name,
      sig: (g) => JSON.stringify(g),
      build: (g) =>
        h('tr', {},
          h('th', { scope: 'row' }, g.name),
          h('td', {}, dash(g.description)),
          h('td', { class: 'num' }, g.members),
          h('td', {}, h('button', {
            type: 'button', class: 'secondary small', dataset: { focus: 'show' },
            'aria-label': `Show the devices of group ${g.name}`,
            onclick: () => {
              $('#device-group').value = g.name;
              $('#device-sn').value = '';
              run(loadDevices).then(() => $('#devices-table').scrollIntoView({ block: 'start' }));
            },
          }, 'Show devices'))),
      empty: emptyRow($('#groups-table tbody'), 'No group yet.'),
    });
  }

  async function loadKeySources() {
    const data = await api('GET', '/v1/key-sources');
    keySources = data.key_sources || [];
    const sig = JSON.stringify(keySources.map((k) => k.name));
    if (sig !== keysSig) {
      keysSig = sig;
      fillKeySelects();
    }
    return keySources;
  }

  // ------------------------------------------------------------------ Devices

  function connectionCell(d) {
    const parts = [d.online ? badge('ok', 'online') : badge('idle', 'offline')];
    if (d.last_seen !== null && d.last_seen !== undefined) parts.push(' ', h('span', { class: 'muted small-text' }, 'last seen ', agoSpan(d.last_seen)));
    else parts.push(' ', h('span', { class: 'muted small-text' }, 'never seen'));
    if (!d.initialised) parts.push(h('div', { class: 'muted small-text' }, 'not initialised'));
    return parts;
  }

  function lockCell(d) {
    const parts = [d.locked ? badge('warn', 'locked') : badge('ok', 'ready')];
    if (d.unlock_pending) parts.push(' ', h('span', { class: 'muted small-text' }, 'unlock pending'));
    if (d.locked && !d.unlock_pending) {
      parts.push(' ', h('button', {
        type: 'button', class: 'secondary small', dataset: { focus: 'unlock' }, 'aria-label': `Unlock ${d.sn}`,
        onclick: (ev) => unlockDevice(d.sn, ev.currentTarget),
      }, 'Unlock'));
    }
    return parts;
  }

  const assignmentCell = (d) => (d.assigned_key_source ? d.assigned_key_source : badge('idle', 'unassigned'));
  const taskCell = (d) => (d.task === 'pending' ? badge('warn', 'pending') : h('span', { class: 'muted' }, 'none'));
  const deviceSig = (d) => JSON.stringify([d.model, d.rom_version, d.app_version, d.online, d.last_seen, d.initialised, d.locked, d.unlock_pending, d.assigned_key_source, d.task]);

  async function unlockDevice(sn, button) {
    const ok = await confirmAction(`Unlock ${sn}?`, `The gateway sends ${sn} a signed unlock command (now if it is online, otherwise when it connects). Another key can then be injected.`, 'Unlock');
    if (!ok) return;
    await run(async () => {
      const r = await api('POST', `/v1/devices/${encodeURIComponent(sn)}/unlock`);
      say(`Unlock of ${sn}: ${r.unlock}.`);
      await loadDevices();
    }, button);
  }

  async function fetchDevices(params) {
    return api('GET', `/v1/devices${query({ ...params, limit: DEVICE_PAGE })}`);
  }

  async function loadDevices() {
    const sn = $('#device-sn').value.trim();
    const group = $('#device-group').value;
    const data = await fetchDevices({ sn, group });
    const devices = data.devices || [];
    const tbody = $('#devices-table tbody');
    renderKeyed(tbody, devices, {
      key: (d) => d.sn,
      sig: deviceSig,
      build: (d) =>
        h('tr', {},
          h('th', { scope: 'row' }, mono(d.sn)),
          h('td', {}, dash(d.model)),
          h('td', {}, dash(d.rom_version)),
          h('td', {}, dash(d.app_version)),
          h('td', {}, connectionCell(d)),
          h('td', {}, lockCell(d)),
          h('td', {}, assignmentCell(d)),
          h('td', {}, taskCell(d))),
      empty: emptyRow(tbody, sn || group ? 'No device matches.' : 'No device yet: your devices come from your provider, who uploads them to the portal.'),
    });
    refreshAgo(tbody);
    const more = devices.length >= DEVICE_PAGE ? ` (the first ${DEVICE_PAGE}; search by SN to narrow)` : '';
    $('#device-count').textContent = `${devices.length} shown of ${data.total} device(s) in the organization${more}.`;
  }

  function wireDevices() {
    $('#device-filter').addEventListener('submit', (ev) => {
      ev.preventDefault();
      run(loadDevices, ev.submitter);
    });
    $('#device-group').addEventListener('change', () => run(loadDevices));

    $('#group-create').addEventListener('submit', (ev) => {
      ev.preventDefault();
      run(async () => {
        const name = $('#group-name').value.trim();
        const description = $('#group-description').value.trim();
        const r = await api('POST', '/v1/groups', { name, description });
        say(`Group ${r.group.name} created.`);
        ev.target.reset();
        await loadGroups();
        $('#group-add-group').value = r.group.name;
      }, ev.submitter);
    });

    $('#group-add').addEventListener('submit', (ev) => {
      ev.preventDefault();
      run(async () => {
        const group = $('#group-add-group').value;
        const sns = parseSns($('#group-add-sns').value);
        if (!group) throw new Error('create a group first');
        const r = await api('POST', `/v1/groups/${encodeURIComponent(group)}/devices`, { sns });
        say(`Group ${group}: ${r.added} device(s) added (${sns.length} named).`);
        $('#group-add-sns').value = '';
        await Promise.all([loadGroups(), loadDevices()]);
      }, ev.submitter);
    });
  }

  // ------------------------------------------------------------------ Provider: the key owner uploads devices

  // Always a dry run first; the upload sends exactly the text that was checked, to the
  // organization it was checked for.
  let checkedUpload = null;

  function uploadResult(...children) {
    $('#upload-result').replaceChildren(...children);
  }

  function uploadErrors(problem) {
    const errors = problem.errors || [];
    return h('div', { class: 'notice bad', id: 'upload-errors' },
      h('h4', {}, problem.detail || 'The file has errors.'),
      h('table', {},
        h('caption', { class: 'sr-only' }, 'Lines with problems'),
        h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Line'), h('th', { scope: 'col' }, 'SN'), h('th', { scope: 'col' }, 'Problem'))),
        h('tbody', {}, errors.map((e) =>
          h('tr', { dataset: { line: e.line ?? '' } },
            h('td', { class: 'num' }, dash(e.line)),
            h('td', {}, mono(e.sn ?? '—')),
            h('td', {}, e.reason))))));
  }

  async function loadOrgs() {
    const data = await api('GET', '/v1/orgs');
    const orgs = data.orgs || [];
    const select = $('#upload-org');
    const keep = select.value;
    const options = orgs.map((o) => h('option', { value: o.name }, o.name));
    if (orgs.length === 0) options.push(h('option', { value: '' }, 'No organization yet'));
    select.replaceChildren(...options);
    if ([...select.options].some((o) => o.value === keep)) select.value = keep;
  }

  function wireUpload() {
    const text = $('#upload-text');
    const org = $('#upload-org');
    const runButton = $('#upload-run');
    const stale = () => {
      if (checkedUpload && (checkedUpload.text !== text.value || checkedUpload.org !== org.value)) {
        checkedUpload = null;
        runButton.disabled = true;
        runButton.textContent = 'Upload';
      }
    };
    text.addEventListener('input', stale);
    org.addEventListener('change', stale);
    $('#upload-file').addEventListener('change', async (ev) => {
      const file = ev.target.files && ev.target.files[0];
      if (!file) return;
      text.value = await file.text();
      stale();
      say(`${file.name} loaded: check it before uploading.`);
    });

    $('#upload-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      run(async () => {
        const csv = text.value;
        const name = org.value;
        if (!name) throw new Error('choose an organization');
        checkedUpload = null;
        runButton.disabled = true;
        runButton.textContent = 'Upload';
        try {
          const r = await api('POST', `/v1/orgs/${encodeURIComponent(name)}/devices/import?dry_run=true`, csv);
          checkedUpload = { text: csv, org: name };
          runButton.disabled = false;
          runButton.textContent = `Upload ${r.valid} device(s) to ${name}`;
          uploadResult(h('p', { class: 'notice ok', id: 'upload-ok' },
            `${r.valid} valid device line(s) for ${name}: ${r.new} new, ${r.already_registered} already registered. Nothing has been uploaded yet.`));
        } catch (e) {
          if (!(e instanceof ApiError) || e.problem.code !== 'invalid_csv') throw e;
          uploadResult(uploadErrors(e.problem));
          say(`${e.message}. Fix the lines shown and check again.`, true);
        }
      }, ev.submitter);
    });

    runButton.addEventListener('click', () => {
      if (!checkedUpload || checkedUpload.text !== text.value || checkedUpload.org !== org.value) return;
      const { text: csv, org: name } = checkedUpload;
      run(async () => {
        try {
          const r = await api('POST', `/v1/orgs/${encodeURIComponent(name)}/devices/import`, csv);
          const msg = `Uploaded ${r.imported} new device(s) to ${name}; ${r.already_registered} already registered.`;
          uploadResult(h('p', { class: 'notice ok', id: 'upload-done' }, msg));
          say(msg);
          checkedUpload = null;
          text.value = '';
          $('#upload-file').value = '';
          runButton.textContent = 'Upload';
        } catch (e) {
          if (!(e instanceof ApiError) || e.problem.code !== 'invalid_csv') throw e;
          uploadResult(uploadErrors(e.problem));
          checkedUpload = null;
          runButton.textContent = 'Upload';
          throw e;
        } finally {
          runButton.disabled = checkedUpload === null;
        }
      });
    });
  }

  // ------------------------------------------------------------------ Key management

  async function loadKeys() {
    const rows = await loadKeySources();
    const tbody = $('#keys-table tbody');
    renderKeyed(tbody, rows, {
      key: (k) => k.name,
      sig: (k) => JSON.stringify(k),
      build: (k) =>
        h('tr', {},
          h('th', { scope: 'row' }, k.name),
          h('td', {}, k.algorithm.toUpperCase()),
          h('td', {}, mono(k.kcv)),
          h('td', {}, mono(k.key_set_id)),
          h('td', {}, fmtTime(k.created_at))),
      empty: emptyRow(tbody, 'No key source is authorized for your organization yet: ask the key owner.'),
    });
  }

  // ------------------------------------------------------------------ Key assignment

  /** Shows the part of a form that matches its checked `*-target` radio. */
  function wireTargetRadios(form) {
    const update = () => {
      const value = $('input[type="radio"]:checked', form).value;
      for (const part of $$('[data-target]', form)) part.hidden = part.dataset.target !== value;
    };
    for (const radio of $$('input[type="radio"]', form)) radio.addEventListener('change', update);
    update();
    return update;
  }

  /** `{group}` or `{sns}` from a form with target radios. */
  function targetOf(form, groupSelect, snsArea) {
    const value = $('input[type="radio"]:checked', form).value;
    if (value === 'group') {
      if (!groupSelect.value) throw new Error('choose a group (create one in the Devices tab)');
      return { group: groupSelect.value };
    }
    const sns = parseSns(snsArea.value);
    if (sns.length === 0) throw new Error('name at least one SN');
    return { sns };
  }

  async function loadAssignments() {
    await Promise.all([loadGroups(), loadKeySources()]);
    const data = await fetchDevices({});
    const tbody = $('#assign-table tbody');
    renderKeyed(tbody, data.devices || [], {
      key: (d) => d.sn,
      sig: deviceSig,
      build: (d) =>
        h('tr', {},
          h('th', { scope: 'row' }, mono(d.sn)),
          h('td', {}, dash(d.model)),
          h('td', {}, assignmentCell(d)),
          h('td', {}, d.locked ? badge('warn', 'locked') : badge('ok', 'ready')),
          h('td', {}, taskCell(d)),
          h('td', {}, h('button', {
            type: 'button', class: 'secondary small', dataset: { focus: 'assign' }, 'aria-label': `Assign a key to ${d.sn}`,
            onclick: () => {
              const form = $('#assign-form');
              $('input[value="sns"]', form).checked = true;
              form._update();
              $('#assign-sns').value = d.sn;
              $('#assign-key').focus();
            },
          }, 'Assign key…'))),
      empty: emptyRow(tbody, 'No device yet.'),
    });
  }

  function wireAssign() {
    const form = $('#assign-form');
    form._update = wireTargetRadios(form);
    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      run(async () => {
        const target = targetOf(form, $('#assign-group'), $('#assign-sns'));
        const keySource = $('#assign-key').value || null;
        const what = target.group ? `group ${target.group}` : target.sns.join(', ');
        if (!keySource && !(await confirmAction('Remove the assignment?', `The devices of ${what} will have no key source.`, 'Remove'))) return;
        const r = await api('POST', '/v1/assignments', { ...target, key_source: keySource });
        say(keySource ? `Assigned ${keySource} to ${r.assigned} device(s) (${what}).` : `Assignment removed from ${r.assigned} device(s).`);
        await loadAssignments();
      }, ev.submitter);
    });
  }

  // ------------------------------------------------------------------ Download tasks

  let taskStatus = 'unfinished';
  const expanded = new Map(); // task id → last detail answer (or null until fetched)
  const stopping = new Set();
  const stoppedHere = new Set(); // stopped from this page: already said, not announced again
  let lastUnfinished = null; // ids seen in the Unfinished list at the previous poll
  let previewed = null; // the exact request that was previewed

  function taskSpec() {
    const form = $('#task-form');
    const spec = targetOf(form, $('#task-group'), $('#task-sns'));
    const key = $('#task-key').value;
    if (key) spec.key_source = key;
    spec.slot = Number($('#task-slot').value);
    const days = Number($('#task-expiry').value);
    if (!Number.isInteger(days)) throw new Error('the expiry must be a whole number of days');
    spec.expiry_days = days;
    return spec;
  }

  /** A reason of the preview: the API's meaning when it gives one, else its code. */
  function reasonText(device, i) {
    const meanings = device.meanings || device.reason_meanings;
    return meanings && meanings[i] ? `${humanize(device.reasons[i])}: ${meanings[i]}` : humanize(device.reasons[i]);
  }

  function snList(sns) {
    const shown = sns.slice(0, 60).join(', ');
    return sns.length > 60 ? `${shown} … and ${sns.length - 60} more` : shown;
  }

  function renderPreview(p) {
    const parts = [
      h('h4', {}, 'Preview'),
      h('dl', { class: 'facts' },
        h('dt', {}, 'Key source'), h('dd', {}, p.key_source || 'none: assign one or choose it above'),
        h('dt', {}, 'Slot'), h('dd', {}, String(p.slot)),
        h('dt', {}, 'Expires after'), h('dd', {}, `${p.expiry_days} days`)),
      h('p', { id: 'preview-ready' }, h('strong', {}, `Ready: ${p.ready.length}`), p.ready.length ? ` — ${snList(p.ready)}` : ''),
    ];
    if (p.never_seen && p.never_seen.length) {
      parts.push(h('p', { class: 'muted' }, `${p.never_seen.length} of them never reported their firmware yet; they get the key when they connect, if it suits them: ${snList(p.never_seen)}.`));
    }
    parts.push(h('p', { id: 'preview-not-ready-count' }, h('strong', {}, `Not ready: ${p.not_ready.length}`)));
    if (p.not_ready.length) {
      parts.push(h('table', { id: 'preview-not-ready' },
        h('caption', { class: 'sr-only' }, 'Devices that are not ready and why'),
        h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'SN'), h('th', { scope: 'col' }, 'Why not'))),
        h('tbody', {}, p.not_ready.map((d) =>
          h('tr', {}, h('td', {}, mono(d.sn)), h('td', {}, h('ul', { class: 'plain' }, d.reasons.map((_, i) => h('li', {}, reasonText(d, i))))))))));
    }
    $('#preview').replaceChildren(h('div', { class: 'notice' }, parts));
  }

  function wireTasks() {
    const form = $('#task-form');
    wireTargetRadios(form);
    const createButton = $('#task-create');
    const invalidate = () => {
      previewed = null;
      createButton.disabled = true;
    };
    form.addEventListener('input', invalidate);
    form.addEventListener('change', invalidate);
    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      run(async () => {
        invalidate();
        const spec = taskSpec();
        const r = await api('POST', '/v1/tasks/preview', spec);
        renderPreview(r.preview);
        if (r.preview.ready.length > 0 && r.preview.key_source) {
          // The request id makes a repeated click create one task, not two.
          previewed = { ...spec, request_id: Date.now() * 1000 + Math.floor(Math.random() * 1000) };
          createButton.disabled = false;
          createButton.textContent = `Create task for ${r.preview.ready.length} device(s)`;
        }
      }, ev.submitter);
    });
    createButton.addEventListener('click', () => {
      if (!previewed) return;
      const spec = previewed;
      run(async () => {
        const r = await api('POST', '/v1/tasks', spec);
        previewed = null;
        createButton.textContent = 'Create task';
        $('#preview').replaceChildren();
        say(`Task #${r.task.id} created for ${r.task.counts.total} device(s).`);
        expanded.set(r.task.id, null);
        selectTaskStatus('unfinished');
        await loadTasks();
      }, createButton).finally(() => (createButton.disabled = previewed === null));
    });

    for (const tab of $$('#task-tabs [role="tab"]')) tab.addEventListener('click', () => selectTaskStatus(tab.dataset.status, true));
    keyboardTabs($('#task-tabs'), (tab) => selectTaskStatus(tab.dataset.status, true));
    selectTaskStatus('unfinished');
  }

  function selectTaskStatus(status, load) {
    taskStatus = status;
    for (const tab of $$('#task-tabs [role="tab"]')) {
      const on = tab.dataset.status === status;
      tab.setAttribute('aria-selected', String(on));
      tab.tabIndex = on ? 0 : -1;
      if (on) $('#tasks-list').setAttribute('aria-labelledby', tab.id);
    }
    if (load) run(loadTasks);
  }

  function outcomeBadge(task) {
    const kind = { 'in progress': 'warn', succeeded: 'ok', 'finished with failures': 'bad', 'manually terminated': 'idle' }[task.outcome] || 'idle';
    return badge(kind, task.outcome);
  }

  function countsText(c) {
    const open = c.queued + c.delivered;
    const parts = [`${c.succeeded} succeeded`];
    if (c.failed) parts.push(`${c.failed} failed`);
    if (c.expired) parts.push(`${c.expired} expired`);
    if (c.terminated) parts.push(`${c.terminated} terminated`);
    if (open) parts.push(`${open} open (${c.queued} queued, ${c.delivered} delivered)`);
    return parts.join(' · ');
  }

  function executionsTable(detail) {
    if (!detail) return h('p', { class: 'muted' }, 'Loading…');
    const shown = detail.executions.length;
    const total = detail.executions_total ?? shown;
    const table = h('table', { class: 'executions' },
      h('caption', { class: 'sr-only' }, `Devices of task ${detail.task.id}`),
      h('thead', {}, h('tr', {},
        ['SN', 'State', 'Connection', 'Deliveries', 'Error code', 'Meaning', 'Key ID (KSN)', 'KCV', 'Ended'].map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, detail.executions.map((e) => {
        const stateKind = { succeeded: 'ok', failed: 'bad', expired: 'warn', terminated: 'idle' }[e.state] || 'warn';
        const code = e.result !== null && e.result !== undefined && e.result !== 0 ? String(e.result) : '—';
        return h('tr', { dataset: { sn: e.sn } },
          h('td', {}, mono(e.sn)),
          h('td', {}, badge(stateKind, e.state === 'terminated' ? 'terminated (manually)' : e.state)),
          h('td', {}, e.online ? badge('ok', 'online') : badge('idle', 'offline')),
          h('td', { class: 'num' }, e.delivery_count),
          h('td', { class: 'num' }, code),
          // An open execution whose terminal refuses the download says why (a signed refusal).
          h('td', {}, e.result ? dash(e.result_meaning)
            : (e.last_refusal ? `refused by the terminal (${e.last_refusal.code}): ${e.last_refusal.meaning}` : '—')),
          h('td', {}, mono(e.key_id)),
          h('td', {}, mono(e.kcv)),
          h('td', {}, fmtTime(e.ended_at)));
      })));
    if (total <= shown) return table;
    return h('div', {},
      h('p', { class: 'muted', dataset: { shown: 'partial' } },
        `The first ${shown.toLocaleString()} of ${total.toLocaleString()} devices; the download records list them all.`),
      table);
  }

  function buildTask(t) {
    const c = t.counts;
    const ended = c.succeeded + c.failed + c.expired + c.terminated;
    const open = expanded.has(t.id);
    const detailId = `task-${t.id}-devices`;
    const actions = [h('button', {
      type: 'button', class: 'secondary small', dataset: { focus: 'details' }, 'aria-expanded': String(open), 'aria-controls': detailId,
      onclick: () => {
        if (expanded.has(t.id)) expanded.delete(t.id);
        else expanded.set(t.id, null);
        run(loadTasks);
      },
    }, open ? 'Hide devices' : 'Show devices')];
    if (t.status === 'done') {
      actions.push(' ', h('button', {
        type: 'button', class: 'secondary small', dataset: { focus: 'records' }, 'aria-label': `Records of task ${t.id}`,
        onclick: () => {
          $('#records-sn').value = '';
          $('#records-task').value = String(t.id);
          recordsOffset = 0;
          showTab('records', true);
        },
      }, 'Records'));
    }
    if (t.status === 'unfinished') {
      actions.push(' ', h('button', {
        type: 'button', class: 'danger small', dataset: { focus: 'stop' }, 'aria-label': `Stop task ${t.id}`,
        disabled: stopping.has(t.id), onclick: (ev) => stopTask(t, ev.currentTarget),
      }, 'Stop'));
    }
    const body = h('tbody', { class: 'task', dataset: { task: t.id, status: t.status, outcome: t.outcome } },
      h('tr', {},
        h('th', { scope: 'row' }, `#${t.id}`),
        h('td', {}, fmtTime(t.created_at), h('div', { class: 'muted small-text' }, `by ${t.created_by}`)),
        h('td', {}, t.key_source),
        h('td', {}, `${t.slot} (${t.key_type})`),
        h('td', {},
          h('progress', { max: c.total, value: ended, 'aria-label': `Task ${t.id}: ${ended} of ${c.total} ended` }),
          ` ${ended}/${c.total}`,
          h('div', { class: 'muted small-text' }, countsText(c))),
        h('td', {}, outcomeBadge(t), h('div', { class: 'muted small-text' }, `expires ${fmtTime(t.expires_at)}`)),
        h('td', {}, actions)));
    if (open) {
      body.append(h('tr', { class: 'detail', id: detailId }, h('td', { colspan: 7 }, executionsTable(expanded.get(t.id)))));
    }
    return body;
  }

  async function stopTask(t, button) {
    const open = t.counts.queued + t.counts.delivered;
    const ok = await confirmAction(`Stop task #${t.id}?`,
      `Its ${open} open execution(s) will be terminated and recorded as "manually terminated". Devices that already acknowledged keep their key.`,
      'Stop task');
    if (!ok) return;
    stopping.add(t.id);
    await run(async () => {
      const r = await api('POST', `/v1/tasks/${t.id}/stop`);
      stoppedHere.add(t.id);
      say(`Task #${t.id} stopped: ${r.terminated} execution(s) terminated (${r.task.outcome}).`);
      await loadTasks();
    }, button);
    stopping.delete(t.id);
  }

  async function loadTasks() {
    const status = taskStatus;
    const data = await api('GET', `/v1/tasks${query({ status, limit: TASKS_MAX })}`);
    if (status !== taskStatus) return; // the operator switched tabs meanwhile
    for (const [name, value] of Object.entries(data.summary || {})) {
      const dd = $(`#dashboard [data-count="${name}"]`);
      if (dd) dd.textContent = String(value);
    }
    const tasks = (data.tasks || []).slice().sort((a, b) => b.id - a.id);
    const ids = new Set(tasks.map((t) => t.id));
    const fetches = [...expanded.keys()].filter((id) => ids.has(id)).slice(0, EXPANDED_MAX)
      .map(async (id) => expanded.set(id, await api('GET', `/v1/tasks/${id}${query({ limit: DEVICES_SHOWN_MAX })}`)));
    await Promise.all(fetches);
    if (status === 'unfinished') await announceFinished(ids);
    renderKeyed($('#tasks-table'), tasks, {
      key: (t) => t.id,
      sig: (t) => JSON.stringify([t, expanded.has(t.id), expanded.get(t.id) || null, stopping.has(t.id)]),
      build: buildTask,
      empty: (isEmpty) => ($('#tasks-empty').hidden = !isEmpty),
    });
    $('#tasks-updated').textContent = `Updated ${fmtTime(Date.now())}; refreshed every ${TASK_POLL_MS / 1000} s.`;
  }

  /** Says when a task left the Unfinished list, with the outcome the API gives it. */
  async function announceFinished(ids) {
    const before = lastUnfinished;
    lastUnfinished = ids;
    if (!before) return;
    for (const id of before) {
      if (ids.has(id) || stoppedHere.has(id)) continue;
      try {
        const r = await api('GET', `/v1/tasks/${id}?limit=0`);
        if (r.task.status === 'done') say(`Task #${id} is done: ${r.task.outcome} (${countsText(r.task.counts)}).`);
      } catch (e) {
        /* the next poll tells */
      }
    }
  }

  // ------------------------------------------------------------------ Download records

  let recordsOffset = 0;

  function recordFilter() {
    return { sn: $('#records-sn').value.trim(), task: $('#records-task').value.trim() };
  }

  function showDerivation(r) {
    const facts = [
      ['SN', r.sn], ['Key source', r.key_source], ['Key type', r.key_type], ['Key ID (KSN)', r.key_id], ['KCV', r.kcv],
      ['Result', r.error_code ? `${r.result} (${r.error_code}: ${r.error_meaning || ''})` : r.result],
      ['Injection', r.injection], ['Time', fmtTime(r.at)], ['Task', `#${r.task_id}`], ['Execution', String(r.execution_id)],
    ];
    $('#derivation-list').replaceChildren(...facts.flatMap(([k, v]) => [h('dt', {}, k), h('dd', { dataset: { fact: k } }, dash(v))]));
    openDialog($('#derivation'));
  }

  async function loadRecords() {
    const data = await api('GET', `/v1/records${query({ ...recordFilter(), limit: RECORDS_PAGE, offset: recordsOffset })}`);
    const records = data.records || [];
    const tbody = $('#records-table tbody');
    renderKeyed(tbody, records, {
      key: (r) => r.id,
      sig: (r) => JSON.stringify(r),
      build: (r) => {
        const kind = { succeeded: 'ok', failed: 'bad', expired: 'warn', terminated: 'idle' }[r.result] || 'idle';
        const label = r.result === 'terminated' ? 'manually terminated' : r.result;
        return h('tr', { dataset: { sn: r.sn } },
          h('td', {}, fmtTime(r.at)),
          h('th', { scope: 'row' }, mono(r.sn)),
          h('td', {}, r.key_source),
          h('td', {}, r.key_type),
          h('td', {}, r.injection),
          h('td', {}, badge(kind, label), r.error_code ? h('div', { class: 'small-text' }, `${r.error_code}: ${dash(r.error_meaning)}`) : null),
          h('td', {}, mono(r.kcv)),
          h('td', {}, h('button', {
            type: 'button', class: 'secondary small', dataset: { focus: 'derivation' }, 'aria-label': `View key derivation record of ${r.sn}`,
            onclick: () => showDerivation(r),
          }, 'View key derivation record')));
      },
      empty: emptyRow(tbody, 'No record.'),
    });
    $('#records-newer').disabled = recordsOffset === 0;
    $('#records-older').disabled = records.length < RECORDS_PAGE;
    $('#records-page').textContent = records.length ? `Records ${recordsOffset + 1}–${recordsOffset + records.length}, newest first.` : '';
    const billing = (await api('GET', '/v1/billing')).billing || [];
    const btbody = $('#billing-table tbody');
    renderKeyed(btbody, billing, {
      key: (b) => `${b.month}/${b.key_source}`,
      sig: (b) => String(b.keys),
      build: (b) => h('tr', {}, h('th', { scope: 'row' }, b.month), h('td', {}, b.key_source), h('td', { class: 'num' }, b.keys)),
      empty: emptyRow(btbody, 'No key injected yet.'),
    });
  }

  async function exportRecords() {
    const res = await fetch(`/v1/records${query({ ...recordFilter(), format: 'csv' })}`, {
      headers: { Authorization: `Bearer ${token}` }, cache: 'no-store', credentials: 'omit',
    });
    if (!res.ok) throw new ApiError(res.status, await res.json().catch(() => null));
    const url = URL.createObjectURL(await res.blob());
    const a = h('a', { href: url, download: 'download-records.csv', hidden: true });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
    say('Records exported to download-records.csv.');
  }

  function wireRecords() {
    $('#records-filter').addEventListener('submit', (ev) => {
      ev.preventDefault();
      recordsOffset = 0;
      run(loadRecords, ev.submitter);
    });
    $('#records-export').addEventListener('click', (ev) => run(exportRecords, ev.currentTarget));
    $('#records-older').addEventListener('click', () => {
      recordsOffset += RECORDS_PAGE;
      run(loadRecords);
    });
    $('#records-newer').addEventListener('click', () => {
      recordsOffset = Math.max(0, recordsOffset - RECORDS_PAGE);
      run(loadRecords);
    });
  }

  // ------------------------------------------------------------------ GUDIDs

  async function loadGudids() {
    const sn = $('#gudid-filter-sn').value.trim();
    const status = $('#gudid-filter-status').value;
    const data = await api('GET', `/v1/gudids${query({ sn })}`);
    const rows = (data.gudids || []).filter((g) => !status || g.status === status);
    const tbody = $('#gudids-table tbody');
    renderKeyed(tbody, rows, {
      key: (g) => g.id,
      sig: (g) => JSON.stringify(g),
      build: (g) => {
        const kind = { unused: 'ok', used: 'idle', expired: 'warn', revoked: 'warn' }[g.status] || 'idle';
        return h('tr', { dataset: { sn: g.sn, status: g.status } },
          h('th', { scope: 'row' }, mono(g.sn)),
          h('td', {}, badge(kind, g.status)),
          h('td', {}, fmtTime(g.provisioned_at)),
          h('td', {}, g.provisioned_by),
          h('td', {}, fmtTime(g.expires_at)),
          h('td', {}, fmtTime(g.used_at)));
      },
      empty: emptyRow(tbody, 'No GUDID.'),
    });
  }

  function wireGudids() {
    $('#gudid-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      run(async () => {
        const sns = parseSns($('#gudid-sns').value);
        if (sns.length === 0) throw new Error('name at least one SN');
        const r = await api('POST', '/v1/gudids', sns.length === 1 ? { sn: sns[0] } : { sns });
        $('#gudid-fresh-table tbody').replaceChildren(...r.gudids.map((g) =>
          h('tr', { dataset: { sn: g.sn } }, h('th', { scope: 'row' }, mono(g.sn)), h('td', { class: 'gudid' }, g.gudid), h('td', {}, fmtTime(g.expires_at)))));
        const box = $('#gudid-fresh');
        box.hidden = false;
        box.focus();
        $('#gudid-sns').value = '';
        say(`${r.gudids.length} GUDID(s) provisioned: shown once, below.`);
        await loadGudids();
      }, ev.submitter);
    });
    $('#gudid-hide').addEventListener('click', () => {
      $('#gudid-fresh-table tbody').replaceChildren();
      $('#gudid-fresh').hidden = true;
    });
    $('#gudid-filter').addEventListener('submit', (ev) => {
      ev.preventDefault();
      run(loadGudids, ev.submitter);
    });
    $('#gudid-filter-status').addEventListener('change', () => run(loadGudids));
  }

  // ------------------------------------------------------------------ tabs, polling, sign-in

  const TABS = {
    devices: { load: () => Promise.all([loadGroups(), loadKeySources()]).then(loadDevices), poll: DEVICE_POLL_MS },
    keys: { load: loadKeys },
    assign: { load: loadAssignments, poll: DEVICE_POLL_MS },
    tasks: { load: () => Promise.all([loadGroups(), loadKeySources()]).then(loadTasks), poll: TASK_POLL_MS, tick: loadTasks },
    records: { load: loadRecords },
    gudids: { load: loadGudids },
  };
  TABS.devices.tick = () => Promise.all([loadGroups(), loadDevices()]);
  TABS.assign.tick = loadAssignments;

  let currentTab = null;
  let pollTimer = null;
  let polling = false;

  function schedulePoll() {
    clearTimeout(pollTimer);
    const tab = TABS[currentTab];
    if (!tab || !tab.poll || !token) return;
    pollTimer = setTimeout(async () => {
      if (!document.hidden && !polling) {
        polling = true;
        try {
          await tab.tick();
        } catch (e) {
          if (e instanceof ApiError && e.status !== 401) say(`Refresh failed: ${e.message}`, true);
        } finally {
          polling = false;
        }
      }
      schedulePoll();
    }, tab.poll);
  }

  function showTab(name, focus) {
    if (!TABS[name]) name = 'devices';
    // A message belongs to the tab it was said on; an error stays until it is read elsewhere.
    if (name !== currentTab && !$('#status').classList.contains('error')) $('#status').hidden = true;
    currentTab = name;
    for (const tab of $$('#tabs [role="tab"]')) {
      const on = tab.dataset.tab === name;
      tab.setAttribute('aria-selected', String(on));
      tab.tabIndex = on ? 0 : -1;
      $(`#${tab.getAttribute('aria-controls')}`).hidden = !on;
      if (on && focus) tab.focus();
    }
    history.replaceState(null, '', `#${name}`);
    run(TABS[name].load);
    schedulePoll();
  }

  /** Arrow keys, Home and End move between the tabs of a tablist (WAI-ARIA tabs pattern). */
  function keyboardTabs(list, activate) {
    list.addEventListener('keydown', (ev) => {
      const tabs = $$('[role="tab"]', list);
      const i = tabs.indexOf(document.activeElement);
      if (i < 0) return;
      const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[ev.key];
      if (next === undefined) return;
      ev.preventDefault();
      const tab = tabs[(next + tabs.length) % tabs.length];
      tab.focus();
      activate(tab);
    });
  }

  function signOut(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    token = null;
    // A fresh page: nothing of this organization stays in the DOM for the next one.
    if (message) sessionStorage.setItem('rki.portal.message', message);
    location.replace(location.pathname);
  }

  /** Who a token is (`t`, else the signed-in one): `{role, org}` from `GET /v1/whoami`. */
  async function whoami(t) {
    return api('GET', '/v1/whoami', undefined, t);
  }

  async function enter() {
    let me;
    try {
      me = await whoami(); // the signed-in token: a 401 signs out
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) return; // signed out by api()
      say(`Cannot reach the gateway: ${e.message}`, true);
      return;
    }
    $('#signin').hidden = true;
    $('#sign-out').hidden = false;
    const who = $('#who');
    who.hidden = false;
    if (me.role === 'key_owner') {
      // The provider's page: uploading each organization's devices, nothing of any organization's fleet.
      who.textContent = 'Key owner (provider)';
      $('#provider').hidden = false;
      history.replaceState(null, '', location.pathname);
      run(loadOrgs);
      return;
    }
    who.textContent = me.org && me.org.name ? `Organization ${me.org.name}` : 'Signed in with an organization token';
    $('#app').hidden = false;
    showTab(location.hash.slice(1));
  }

  async function signIn(ev) {
    ev.preventDefault();
    const input = $('#token');
    const error = $('#signin-error');
    const candidate = input.value.trim();
    error.hidden = true;
    try {
      await whoami(candidate);
    } catch (e) {
      error.textContent = e.status === 401 ? 'This token is not valid.' : `Cannot sign in: ${e.message}`;
      error.hidden = false;
      input.focus();
      return;
    }
    token = candidate;
    sessionStorage.setItem(TOKEN_KEY, token);
    input.value = '';
    await enter();
    $('#main').focus();
  }

  function start() {
    $('#signin-form').addEventListener('submit', signIn);
    $('#sign-out').addEventListener('click', () => signOut());
    for (const tab of $$('#tabs [role="tab"]')) tab.addEventListener('click', () => showTab(tab.dataset.tab));
    keyboardTabs($('#tabs'), (tab) => showTab(tab.dataset.tab));
    wireDevices();
    wireAssign();
    wireTasks();
    wireRecords();
    wireGudids();
    wireUpload();
    document.addEventListener('visibilitychange', () => {
      if (!document.hidden && currentTab) schedulePoll();
    });
    const message = sessionStorage.getItem('rki.portal.message');
    if (message) {
      sessionStorage.removeItem('rki.portal.message');
      $('#signin-error').textContent = message;
      $('#signin-error').hidden = false;
    }
    if (token) enter();
    else $('#token').focus();
  }

  start();
})();
