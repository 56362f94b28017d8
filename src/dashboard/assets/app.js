// The migration dashboard: renders the snapshots /dashboard/events streams.
// No dependencies, nothing fetched from another origin; every value an
// element shows is also in its data-value attribute, unformatted.
'use strict';

(function () {
  const WINDOWS = ['5m', '1h', '1d', 'all'];
  const WINDOW_NAMES = { '5m': 'last 5 minutes', '1h': 'last hour', '1d': 'last day', all: 'all time' };
  const MODE_NAMES = {
    dual: 'dual: legacy and Clerk tokens',
    clerk_only: 'clerk_only: Clerk tokens only',
    legacy_only: 'legacy_only: legacy tokens only (rollback)',
  };
  const METHOD_NAMES = { legacy_jwt: 'Legacy JWT', clerk: 'Clerk', unknown: 'Unreadable token' };
  const SVG = 'http://www.w3.org/2000/svg';
  const number = new Intl.NumberFormat();

  const $ = (id) => document.getElementById(id);

  /** Sets an element's raw value (data-value) and its text. */
  function show(id, value, text) {
    const el = $(id);
    if (!el) return;
    el.dataset.value = String(value);
    el.textContent = text === undefined ? number.format(value) : text;
  }

  const percent = (ratio) => (ratio * 100).toFixed(1) + '%';

  function duration(us) {
    if (!us) return '–';
    if (us < 1000) return us + ' µs';
    if (us < 1000000) return (us / 1000).toFixed(us < 10000 ? 1 : 0) + ' ms';
    return (us / 1000000).toFixed(2) + ' s';
  }

  function since(iso) {
    const seconds = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
    if (seconds < 60) return seconds + ' s ago';
    if (seconds < 3600) return Math.round(seconds / 60) + ' min ago';
    if (seconds < 86400) return Math.round(seconds / 3600) + ' h ago';
    return Math.round(seconds / 86400) + ' days ago';
  }

  function eta(seconds) {
    if (seconds === null || seconds === undefined) return '';
    if (seconds < 60) return 'about ' + seconds + ' s left';
    if (seconds < 3600) return 'about ' + Math.ceil(seconds / 60) + ' min left';
    return 'about ' + (seconds / 3600).toFixed(1) + ' h left';
  }

  function setBar(barId, fillId, ratio) {
    const clamped = Math.min(1, Math.max(0, ratio || 0));
    // CSSOM, allowed by the page's Content-Security-Policy (no inline styles).
    $(fillId).style.width = clamped * 100 + '%';
    $(barId).setAttribute('aria-valuenow', (clamped * 100).toFixed(1));
    $(barId).dataset.value = String(clamped);
  }

  function clear(el) {
    while (el.firstChild) el.removeChild(el.firstChild);
  }

  function cell(row, text, className) {
    const td = document.createElement('td');
    td.textContent = text;
    if (className) td.className = className;
    row.appendChild(td);
    return td;
  }

  function renderUsers(u) {
    show('users-migrated', u.migrated + u.clerk_native);
    show('users-total', u.total);
    show('migrated-percent', u.migrated_ratio, percent(u.migrated_ratio));
    show('users-legacy', u.legacy_only);
    show('users-linked', u.migrated);
    show('users-clerk-native', u.clerk_native);
    setBar('progress-bar', 'progress-fill', u.migrated_ratio);
  }

  function renderAuth(a) {
    show('success-rate', a.success_rate, a.attempts ? percent(a.success_rate) : '–');
    show('auth-successes', a.successes);
    show('auth-attempts', a.attempts);
    show('error-rate', a.error_rate, a.attempts ? percent(a.error_rate) : '–');
    show('auth-errors', a.errors);
    show('auth-rejections', a.rejections);
    $('error-rate').classList.toggle('good', a.attempts > 0 && a.errors === 0);
  }

  function renderMethods(methods) {
    const body = $('methods-body');
    clear(body);
    if (!methods.length) {
      const row = body.insertRow();
      const td = cell(row, 'No verifications in this window.', 'muted');
      td.colSpan = 5;
      return;
    }
    for (const m of methods) {
      const row = body.insertRow();
      row.dataset.method = m.method;
      const name = cell(row, '');
      const swatch = document.createElement('span');
      swatch.className = 'swatch m-' + m.method;
      name.appendChild(swatch);
      name.appendChild(document.createTextNode(METHOD_NAMES[m.method] || m.method));
      cell(row, number.format(m.attempts)).dataset.value = String(m.attempts);
      cell(row, m.attempts ? percent(m.successes / m.attempts) : '–').dataset.value = String(m.successes);
      cell(row, number.format(m.errors)).dataset.value = String(m.errors);
      const reasons = m.rejections.slice(0, 3).map((r) => r.reason.replace(/_/g, ' ') + ' ' + number.format(r.count));
      cell(row, reasons.join(' · ') || '–', 'reasons');
    }
  }

  function renderChart(series) {
    const svg = $('chart');
    clear(svg);
    const width = 600;
    const height = 140;
    const top = 4;
    let max = 0;
    for (const m of series.methods) for (const v of m.attempts) max = Math.max(max, v);
    for (const fraction of [0, 0.5, 1]) {
      const line = document.createElementNS(SVG, 'line');
      const y = height - 1 - fraction * (height - top - 1);
      line.setAttribute('x1', '0');
      line.setAttribute('x2', String(width));
      line.setAttribute('y1', String(y));
      line.setAttribute('y2', String(y));
      line.setAttribute('class', 'grid');
      svg.appendChild(line);
    }
    $('chart-peak').textContent = max
      ? 'Verifications per minute, last hour (peak ' + number.format(max) + ')'
      : 'No verifications in the last hour';
    const legend = $('chart-legend');
    clear(legend);
    for (const m of series.methods) {
      const n = m.attempts.length;
      const points = m.attempts.map((v, i) => {
        const x = n > 1 ? (i / (n - 1)) * width : 0;
        const y = height - 1 - (max ? (v / max) * (height - top - 1) : 0);
        return x.toFixed(1) + ',' + y.toFixed(1);
      });
      const line = document.createElementNS(SVG, 'polyline');
      line.setAttribute('points', points.join(' '));
      line.setAttribute('class', 'm-' + m.method);
      line.dataset.method = m.method;
      line.dataset.total = String(m.attempts.reduce((a, b) => a + b, 0));
      svg.appendChild(line);
      const key = document.createElement('span');
      const swatch = document.createElement('span');
      swatch.className = 'swatch m-' + m.method;
      key.appendChild(swatch);
      key.appendChild(document.createTextNode(METHOD_NAMES[m.method] || m.method));
      legend.appendChild(key);
    }
  }

  function renderInvitations(inv) {
    show('inv-sent', inv.sent);
    show('inv-pending', inv.pending);
    show('inv-completed', inv.completed);
    show('inv-expired', inv.expired);
    show('inv-failed', inv.failed_deliveries);
  }

  function renderBulk(job) {
    $('bulk-none').hidden = !!job;
    $('bulk-job').hidden = !job;
    if (!job) return;
    const state = $('bulk-state');
    state.dataset.state = job.state;
    show('bulk-state', job.state, job.state);
    show('bulk-processed', job.processed);
    show('bulk-total', job.total);
    show('bulk-created', job.created);
    show('bulk-linked', job.linked_existing);
    show('bulk-skipped', job.skipped);
    show('bulk-failed', job.failed);
    $('bulk-eta').textContent = job.state === 'running' ? eta(job.eta_seconds) : '';
    const started = $('bulk-started');
    started.dateTime = job.started_at;
    started.textContent = new Date(job.started_at).toLocaleString() + ' (' + since(job.started_at) + ')';
    setBar('bulk-bar', 'bulk-fill', job.ratio);
  }

  function renderReadiness(r) {
    show('readiness-locked-out', r.would_be_locked_out);
    show('readiness-active', r.active_users);
    show('readiness-days', r.days);
    show('readiness-legacy-by-migrated', r.legacy_verifications_by_migrated);
    $('readiness-locked-out').classList.toggle('good', r.would_be_locked_out === 0);
  }

  function renderMode(mode) {
    const pill = $('auth-mode');
    pill.dataset.mode = mode.mode;
    show('auth-mode', mode.mode, mode.mode);
    pill.title = MODE_NAMES[mode.mode] || mode.mode;
    $('auth-mode-set').textContent = mode.set_at
      ? 'Set by ' + mode.set_by + ', ' + new Date(mode.set_at).toLocaleString() + ' (' + since(mode.set_at) + ')'
      : 'The default: never set.';
  }

  // --- Clerk sync (issue 17: reconciliation and webhooks) -----------------
  // Shown only when a snapshot carries `clerk_sync`, an object of sections
  // (the last reconciliation pass), each an object of figures; without a
  // pass the card stays hidden rather than show made-up data.
  function renderClerkSync(sync) {
    const card = $('card-clerk-sync');
    card.hidden = !sync;
    if (!sync) return;
    const list = $('clerk-sync-items');
    clear(list);
    for (const [section, figures] of Object.entries(sync)) {
      const entries = figures && typeof figures === 'object' ? Object.entries(figures) : [['', figures]];
      for (const [key, value] of entries) {
        const dt = document.createElement('dt');
        // Keys may start with an order ("1 state"): sorted by the server, not shown.
        dt.textContent = (section + (key ? ' ' + key.replace(/^\d+ /, '') : '')).replace(/_/g, ' ');
        const dd = document.createElement('dd');
        dd.textContent = value === null || value === undefined ? '–' : String(value);
        list.appendChild(dt);
        list.appendChild(dd);
      }
    }
  }

  function render(view) {
    renderUsers(view.users);
    renderAuth(view.auth);
    renderMethods(view.methods);
    show('latency-p50', view.latency_us.p50, duration(view.latency_us.p50));
    show('latency-p95', view.latency_us.p95, duration(view.latency_us.p95));
    show('latency-p99', view.latency_us.p99, duration(view.latency_us.p99));
    renderChart(view.series);
    renderInvitations(view.invitations);
    renderBulk(view.bulk_job);
    renderReadiness(view.readiness);
    renderMode(view.auth_mode);
    renderClerkSync(view.clerk_sync);
    const updated = $('updated-at');
    updated.dateTime = view.at;
    updated.dataset.value = view.at;
    updated.textContent = new Date(view.at).toLocaleTimeString();
    show('window-name', view.window, WINDOW_NAMES[view.window] || view.window);
    document.body.dataset.snapshots = String(Number(document.body.dataset.snapshots || 0) + 1);
  }

  // --- The stream -----------------------------------------------------------

  let source = null;
  let retryMs = 1000;
  let retryTimer = null;
  let lastGood = null;
  let current = new URLSearchParams(location.search).get('window');
  if (!WINDOWS.includes(current)) current = '1h';

  function setStatus(state, text) {
    const status = $('status');
    status.dataset.state = state;
    status.textContent = text;
  }

  function showBanner(text) {
    const banner = $('banner');
    banner.textContent = text;
    banner.hidden = !text;
    $('figures').classList.toggle('stale', !!text && lastGood !== null);
  }

  function connect() {
    clearTimeout(retryTimer);
    if (source) source.close();
    source = new EventSource('/dashboard/events?window=' + encodeURIComponent(current));
    source.addEventListener('snapshot', (event) => {
      retryMs = 1000;
      const view = JSON.parse(event.data);
      lastGood = view.at;
      render(view);
      $('figures').setAttribute('aria-busy', 'false');
      showBanner('');
      setStatus('live', 'Live');
    });
    source.addEventListener('unavailable', (event) => {
      const data = JSON.parse(event.data);
      setStatus('unavailable', 'Figures unavailable');
      const from = lastGood ? ' The figures shown are from ' + new Date(lastGood).toLocaleTimeString() + '.' : '';
      showBanner('Cannot read the figures: ' + data.reason + '.' + from + ' Retrying…');
    });
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) {
        // Refused (e.g. too many open dashboards): try again, backing off.
        setStatus('reconnecting', 'Reconnecting…');
        retryTimer = setTimeout(connect, retryMs);
        retryMs = Math.min(retryMs * 2, 30000);
      } else {
        setStatus('reconnecting', 'Reconnecting…');
      }
      showBanner('The connection to the service was lost. Reconnecting…');
    };
  }

  function selectWindow(name, remember) {
    current = name;
    for (const button of document.querySelectorAll('.windows button')) {
      button.setAttribute('aria-pressed', String(button.dataset.window === name));
    }
    if (remember) {
      // A reload or a shared link keeps the window.
      const url = new URL(location.href);
      url.searchParams.set('window', name);
      history.replaceState(null, '', url);
    }
    connect();
  }

  for (const button of document.querySelectorAll('.windows button')) {
    button.addEventListener('click', () => selectWindow(button.dataset.window, true));
  }
  window.addEventListener('pagehide', () => source && source.close());
  selectWindow(current, false);
})();
