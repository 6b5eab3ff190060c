// The demo SPA: plain JavaScript, no build step, no token anywhere.
//
// It talks to its own origin only: /auth/login (a navigation), /auth/session,
// /auth/logout and /api/*. The session cookie is HttpOnly, so this script never sees it;
// every call sends `X-CSRF: 1`, which tokengate demands of cookie-authenticated requests
// (a cross-site page cannot add a custom header without a CORS preflight).
'use strict';

const CSRF_HEADER = { 'X-CSRF': '1' };
const AUTO_CALL_MS = 5000;
const MAX_LOG_LINES = 60;
const TIME_CLAIMS = new Set(['exp', 'iat', 'nbf', 'auth_time']);
const CLAIM_ORDER = ['sub', 'scope', 'aud', 'iss', 'client_id', 'iat', 'exp'];

const $ = (id) => document.getElementById(id);
const state = { authenticated: false, tokenExp: null, tokenIat: null, autoTimer: null };

function clock(date = new Date()) {
  return date.toLocaleTimeString('en-GB', { hour12: false });
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function logCall(method, path, status, ms, note) {
  const ok = typeof status === 'number' && status >= 200 && status < 300;
  const line = el('li', undefined, ok ? 'ok' : 'err');
  line.dataset.status = String(status);
  line.dataset.path = path;
  line.append(
    el('span', clock(), 'time'),
    el('span', `${method} ${path}`, 'what'),
    el('span', String(status), 'status'),
    el('span', `${ms} ms`, 'ms'),
  );
  if (note) line.append(el('span', note, 'note'));
  $('log').prepend(line);
  while ($('log').children.length > MAX_LOG_LINES) $('log').lastElementChild.remove();
}

// One same-origin call with the CSRF header; logs a line; returns {status, data}.
async function call(method, path, body) {
  const init = { method, credentials: 'same-origin', headers: { ...CSRF_HEADER } };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const started = performance.now();
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    logCall(method, path, 'failed', Math.round(performance.now() - started), String(err));
    return { status: 0, data: null };
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  const ms = Math.round(performance.now() - started);
  const note = response.ok ? noteFor(path, data) : data && data.error;
  logCall(method, path, response.status, ms, note || '');
  return { status: response.status, data };
}

function noteFor(path, data) {
  if (path !== '/api/me' || !data || !data.claims) return '';
  const { iat, exp } = data.claims;
  const renewed = state.tokenIat !== null && iat !== state.tokenIat;
  state.tokenIat = iat;
  state.tokenExp = exp;
  const issued = `access token issued ${clock(new Date(iat * 1000))}`;
  return renewed ? `${issued} (refreshed by tokengate)` : issued;
}

function formatValue(key, value) {
  if (TIME_CLAIMS.has(key) && typeof value === 'number') {
    return `${value} (${clock(new Date(value * 1000))})`;
  }
  return typeof value === 'object' ? JSON.stringify(value) : String(value);
}

function renderTable(tbody, entries, emptyText) {
  tbody.replaceChildren();
  if (entries.length === 0) {
    const row = el('tr');
    const cell = el('td', emptyText, 'empty');
    cell.colSpan = 2;
    row.append(cell);
    tbody.append(row);
    return;
  }
  for (const [key, value] of entries) {
    const row = el('tr');
    row.append(el('td', key), el('td', formatValue(key, value)));
    tbody.append(row);
  }
}

function renderSession(info) {
  state.authenticated = Boolean(info && info.authenticated);
  document.body.classList.toggle('authed', state.authenticated);
  const claims = state.authenticated ? info.claims || {} : {};
  $('status').textContent = state.authenticated
    ? `Logged in as ${claims.preferred_username || claims.sub}`
    : 'Not logged in';
  renderTable($('claims'), Object.entries(claims), 'Not logged in.');
  $('session-expiry').textContent = state.authenticated && info.expires_at
    ? `Session ends at the latest ${new Date(info.expires_at * 1000).toLocaleString('en-GB')}.`
    : '';
  $('js-cookies').textContent = document.cookie === '' ? '""' : JSON.stringify(document.cookie);
  if (!state.authenticated) setAutoCall(false);
}

async function refreshSession() {
  const { status, data } = await call('GET', '/auth/session');
  renderSession(status === 200 ? data : null);
}

async function callApi() {
  const { status, data } = await call('GET', '/api/me');
  if (status === 200 && data) {
    const rank = (key) => (CLAIM_ORDER.includes(key) ? CLAIM_ORDER.indexOf(key) : CLAIM_ORDER.length);
    const entries = Object.entries(data.claims || {}).sort(([a], [b]) => rank(a) - rank(b));
    entries.push(['server_time', data.server_time]);
    renderTable($('api-claims'), entries, 'No claims.');
    renderTokenLife();
  } else if (status === 401) {
    await refreshSession(); // the session ended (logout elsewhere, expiry): show it
  }
}

async function addItem() {
  const input = $('item-text');
  const text = input.value.trim() || `Item added at ${clock()}`;
  const { status, data } = await call('POST', '/api/items', { text });
  if (status === 201 && data) {
    input.value = '';
    renderItems(data.items);
  } else if (status === 401) {
    await refreshSession();
  }
}

function renderItems(items) {
  const list = $('items');
  list.replaceChildren();
  if (!items.length) list.append(el('li', 'Nothing yet.', 'empty'));
  for (const item of items.slice().reverse()) {
    const line = el('li', item.text);
    line.append(el('small', `${item.owner} · ${clock(new Date(item.created_at * 1000))}`));
    list.append(line);
  }
}

async function logout() {
  setAutoCall(false);
  const { status, data } = await call('POST', '/auth/logout');
  if (status === 200 && data && data.logout_url) {
    window.location.assign(data.logout_url); // end the IdP's session too
    return;
  }
  await refreshSession();
}

function renderTokenLife() {
  const target = $('token-life');
  if (state.tokenExp === null) {
    target.textContent = '';
    return;
  }
  const left = Math.round(state.tokenExp - Date.now() / 1000);
  target.replaceChildren(
    'The access token the API last saw ',
    el('strong', left > 0 ? `expires in ${left} s` : `expired ${-left} s ago`),
    left > 0 ? '.' : '; the next call gets a fresh one.',
  );
}

function setAutoCall(on) {
  $('auto-call').checked = on;
  if (state.autoTimer !== null) clearInterval(state.autoTimer);
  state.autoTimer = on ? setInterval(callApi, AUTO_CALL_MS) : null;
  if (on) callApi();
}

$('login').addEventListener('click', () => {
  window.location.assign('/auth/login?return_to=/');
});
$('logout').addEventListener('click', logout);
$('call-api').addEventListener('click', callApi);
$('add-item').addEventListener('click', addItem);
$('item-text').addEventListener('keydown', (event) => {
  if (event.key === 'Enter') addItem();
});
$('auto-call').addEventListener('change', (event) => setAutoCall(event.target.checked));
setInterval(renderTokenLife, 1000);
refreshSession();
