// The admin page of sc-master: reads the admin API with the bearer token, follows GET /events
// (Server-Sent Events read with fetch, since EventSource cannot send the token), draws the
// members table, the recent errors and three time charts as inline SVG. No library, no build.
'use strict';

(() => {
  const TOKEN_KEY = 'sc-admin-token';
  const SVG = 'http://www.w3.org/2000/svg';
  const W = 420;
  const H = 150;
  const PAD = { left: 40, right: 8, top: 8, bottom: 18 };

  let token = '';
  let windowMs = 15 * 60 * 1000;
  let samples = [];
  let status = null;
  let waitingFor = 0;
  let streamAbort = null;

  const $ = (id) => document.getElementById(id);

  // The token: from the URL fragment (sc-master prints such a link), kept for this tab only.
  function takeToken() {
    const m = location.hash.match(/(?:^#|&)token=([^&]+)/);
    if (m) {
      sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
      history.replaceState(null, '', location.pathname + location.search);
    }
    return sessionStorage.getItem(TOKEN_KEY) || '';
  }

  function askToken(why) {
    if (streamAbort) streamAbort.abort();
    sessionStorage.removeItem(TOKEN_KEY);
    token = '';
    $('main').hidden = true;
    $('token-form').hidden = false;
    $('token-error').textContent = why || '';
    setLive('off', 'no token');
    $('token-input').focus();
  }

  function start() {
    $('token-form').hidden = true;
    $('main').hidden = false;
    follow();
  }

  async function api(path, body) {
    const init = { headers: { authorization: `Bearer ${token}` } };
    if (body !== undefined) {
      init.method = 'POST';
      init.headers['content-type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    let json = null;
    try { json = await response.json(); } catch { /* no JSON body */ }
    if (response.status === 401) askToken('the token was refused');
    return { status: response.status, body: json };
  }

  function setLive(state, text) {
    const live = $('live');
    live.dataset.state = state;
    live.textContent = text;
  }

  function notice(text, bad) {
    const n = $('notice');
    n.textContent = text;
    n.className = bad ? 'bad' : '';
  }

  // GET /events, again after each end or failure, until the token is refused.
  async function follow() {
    for (;;) {
      if (!token) return;
      const abort = new AbortController();
      streamAbort = abort;
      try {
        const response = await fetch('/events', { headers: { authorization: `Bearer ${token}` }, signal: abort.signal });
        if (response.status === 401) { askToken('the token was refused'); return; }
        if (!response.ok || !response.body) throw new Error(`status ${response.status}`);
        setLive('on', 'live');
        await readEvents(response.body.getReader());
      } catch (e) {
        if (abort.signal.aborted) return;
      }
      setLive('off', 'reconnecting');
      await new Promise((r) => setTimeout(r, 1500));
    }
  }

  async function readEvents(reader) {
    const decoder = new TextDecoder();
    let buffer = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf('\n\n')) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let name = 'message';
        const data = [];
        for (const line of block.split('\n')) {
          if (line.startsWith('event:')) name = line.slice(6).trim();
          else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
        }
        if (data.length) onEvent(name, JSON.parse(data.join('\n')));
      }
    }
  }

  function onEvent(name, data) {
    if (name === 'history') {
      windowMs = data.window_ms || windowMs;
      samples = data.samples || [];
    } else if (name === 'sample' && data.sample) {
      const last = samples.length ? samples[samples.length - 1].t : 0;
      if (data.sample.t > last) samples.push(data.sample);
    }
    const newest = samples.length ? samples[samples.length - 1].t : 0;
    while (samples.length && samples[0].t < newest - windowMs) samples.shift();
    if (data.status) { status = data.status; renderStatus(); }
    renderCharts();
  }

  // ---- status: summary, members, rolling restart, errors ----

  function duration(ms) {
    if (ms === null || ms === undefined) return '';
    let s = Math.floor(ms / 1000);
    const d = Math.floor(s / 86400); s -= d * 86400;
    const h = Math.floor(s / 3600); s -= h * 3600;
    const m = Math.floor(s / 60); s -= m * 60;
    const two = (n) => String(n).padStart(2, '0');
    if (d) return `${d}d ${two(h)}h`;
    if (h) return `${h}h ${two(m)}m`;
    if (m) return `${m}m ${two(s)}s`;
    return `${s}s`;
  }

  function cell(row, text, className) {
    const td = document.createElement('td');
    td.textContent = text === undefined || text === null ? '' : String(text);
    if (className) td.className = className;
    row.appendChild(td);
    return td;
  }

  function renderStatus() {
    const s = status;
    $('summary').textContent = `${s.mode} · epoch ${s.epoch} · master pid ${s.master.pid}, up ${duration(s.master.uptime_ms)}`;
    const order = { balancer: 0, worker: 1, broker: 2 };
    const members = [...s.members].sort((a, b) => (order[a.role] - order[b.role]) || a.id.localeCompare(b.id));
    $('member-count').textContent = `(${members.length})`;
    const body = $('members').tBodies[0];
    body.replaceChildren();
    for (const m of members) {
      const row = document.createElement('tr');
      row.dataset.id = m.id;
      row.dataset.role = m.role;
      row.dataset.pid = m.pid ?? '';
      row.dataset.state = m.state;
      cell(row, m.role);
      cell(row, m.id, 'id');
      cell(row, m.address || m.grpc);
      cell(row, m.pid, 'pid');
      const state = m.state + (m.replacement_pid ? ` → ${m.replacement_pid}` : '')
        + (m.health_misses ? ` (${m.health_misses} missed)` : '')
        + (m.redis === 'down' ? ', redis down' : '');
      cell(row, state, `state ${m.state}`);
      cell(row, duration(m.uptime_ms));
      cell(row, m.restarts ?? 0);
      cell(row, m.last_error || '', 'last-error');
      const action = cell(row, '');
      if (m.role === 'broker' && s.mode === 'supervise') {
        const drained = m.state === 'drained';
        if (drained || m.state === 'healthy' || m.state === 'running') {
          const button = document.createElement('button');
          button.type = 'button';
          button.className = drained ? 'undrain' : 'drain';
          button.textContent = drained ? 'Start again' : 'Drain';
          button.addEventListener('click', () => drain(m.id, !drained, button));
          action.appendChild(button);
        }
      }
      body.appendChild(row);
    }

    const rr = s.rolling_restart || {};
    const state = $('rolling-state');
    const button = $('rolling-restart');
    button.disabled = s.mode !== 'supervise' || !!rr.running;
    if (rr.running) {
      state.dataset.state = 'running';
      state.textContent = `rolling restart #${rr.started} running…`;
    } else if (rr.last && rr.last.number >= waitingFor) {
      state.dataset.state = rr.last.ok ? 'done' : 'failed';
      state.dataset.number = rr.last.number;
      const when = new Date(rr.last.finished_ms).toLocaleTimeString();
      state.textContent = `rolling restart #${rr.last.number} ${rr.last.ok ? 'completed' : 'failed'} at ${when}: ${rr.last.message}`;
    }

    const list = $('errors');
    list.replaceChildren();
    const errors = [...(s.recent_errors || [])].reverse();
    $('error-count').textContent = `(${errors.length})`;
    for (const e of errors) {
      const li = document.createElement('li');
      li.className = e.severity;
      const time = document.createElement('time');
      time.textContent = new Date(e.time_ms).toLocaleTimeString();
      const who = document.createElement('span');
      who.className = 'who';
      who.textContent = e.role === 'master' ? 'master' : `${e.id || e.role}${e.pid ? ` (pid ${e.pid})` : ''}`;
      const text = document.createElement('span');
      text.textContent = e.message;
      li.append(time, who, text);
      list.appendChild(li);
    }
  }

  async function rollingRestart() {
    const button = $('rolling-restart');
    button.disabled = true;
    const { status: code, body } = await api('/rolling-restart', {});
    if (code === 202) {
      waitingFor = body.number;
      const state = $('rolling-state');
      state.dataset.state = 'running';
      state.textContent = `rolling restart #${body.number} started`;
      notice('');
    } else if (code !== 401) {
      notice(body && body.error ? body.error : `rolling restart refused (${code})`, true);
      button.disabled = false;
    }
  }

  async function drain(id, drainIt, button) {
    button.disabled = true;
    const { status: code, body } = await api(drainIt ? '/drain' : '/undrain', { id });
    if (code === 202) notice(drainIt ? `${id} draining: its channels move to the other brokers` : `${id} starting again`);
    else if (code !== 401) notice(body && body.error ? body.error : `refused (${code})`, true);
  }

  // ---- charts ----

  function nice(max) {
    if (max <= 0) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(max)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= max) return m * p;
    return 10 * p;
  }

  function fmt(v) {
    if (v >= 1e6) return `${(v / 1e6).toFixed(1)}M`;
    if (v >= 1e4) return `${(v / 1e3).toFixed(0)}k`;
    if (v >= 1e3) return `${(v / 1e3).toFixed(1)}k`;
    if (v >= 10 || v === 0) return v.toFixed(0);
    return v.toFixed(1);
  }

  function el(name, attrs, text) {
    const e = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function renderCharts() {
    const scraped = samples.length ? samples[samples.length - 1].scraped : 0;
    $('figures-note').textContent = samples.length && scraped === 0
      ? '(no member serves figures yet: charts stay flat)' : '';
    for (const chart of document.querySelectorAll('.chart')) drawChart(chart);
  }

  function drawChart(chart) {
    const series = chart.dataset.series.split(',').map((s) => { const [key, label] = s.split(':'); return { key, label }; });
    const unit = chart.dataset.unit;
    const now = samples.length ? samples[samples.length - 1].t : Date.now();
    const from = now - windowMs;
    let max = 0;
    for (const s of samples) for (const { key } of series) max = Math.max(max, s[key] || 0);
    const top = nice(max);
    const x = (t) => PAD.left + ((t - from) / windowMs) * (W - PAD.left - PAD.right);
    const y = (v) => H - PAD.bottom - (v / top) * (H - PAD.top - PAD.bottom);

    const svg = chart.querySelector('svg');
    svg.replaceChildren();
    for (const frac of [0, 0.5, 1]) {
      const gy = y(top * frac);
      svg.appendChild(el('line', { x1: PAD.left, x2: W - PAD.right, y1: gy, y2: gy, class: 'rule' }));
      svg.appendChild(el('text', { x: PAD.left - 4, y: gy + 4, class: 'axis', 'text-anchor': 'end' }, fmt(top * frac)));
    }
    for (const min of [15, 10, 5, 0]) {
      const gx = x(now - min * 60000);
      svg.appendChild(el('text', { x: gx, y: H - 4, class: 'axis', 'text-anchor': min === 15 ? 'start' : min === 0 ? 'end' : 'middle' },
        min ? `-${min}m` : 'now'));
    }
    const last = {};
    series.forEach(({ key }, i) => {
      const points = samples.map((s) => `${x(s.t).toFixed(1)},${y(s[key] || 0).toFixed(1)}`).join(' ');
      if (points) svg.appendChild(el('polyline', { points, class: `line s${i}`, 'data-key': key }));
      last[key] = samples.length ? samples[samples.length - 1][key] || 0 : 0;
    });
    chart.dataset.last = JSON.stringify(last);
    chart.dataset.max = String(max);
    chart.dataset.points = String(samples.length);

    const legend = chart.querySelector('.legend');
    legend.replaceChildren();
    series.forEach(({ key, label }, i) => {
      const item = document.createElement('span');
      item.className = `key s${i}`;
      item.textContent = `${label} ${fmt(last[key])}${unit}`;
      legend.appendChild(item);
    });
  }

  document.addEventListener('DOMContentLoaded', () => {
    $('token-form').addEventListener('submit', (event) => {
      event.preventDefault();
      const given = $('token-input').value.trim();
      if (!given) return;
      token = given;
      sessionStorage.setItem(TOKEN_KEY, token);
      $('token-input').value = '';
      start();
    });
    $('rolling-restart').addEventListener('click', rollingRestart);
    token = takeToken();
    if (token) start(); else askToken('');
  });
})();
