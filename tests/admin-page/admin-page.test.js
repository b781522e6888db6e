// The master's admin page in headless Chromium (Debian's chromium, driven by playwright-core)
// against a real cluster (target/debug/sc-master, 2 workers, 2 brokers): the page loads from the
// link sc-master prints with no console error, shows every member of /status, its message and
// connection charts move while stock v20 clients subscribe and publish, a rolling restart
// started from its button completes (new worker pids on the page), and a broker drained from
// its button leaves and comes back. Screenshots go to target/admin-page/ (and, with
// SC_ADMIN_PAGE_DOCS=1, the one under load to docs/admin-page.png).
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';
import socketClusterClient from 'socketcluster-client';
import { startCluster, status, eventually, root } from './cluster.js';

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const SHOTS = path.join(process.env.CARGO_TARGET_DIR || path.join(root, 'target'), 'admin-page');
const SUBSCRIBERS = 10;
const PUBLISH_EVERY_MS = 20;

let cluster;
let browser;
const sockets = [];
let publishing = false;

after(async () => {
  publishing = false;
  for (const s of sockets) s.disconnect();
  await browser?.close();
  await cluster?.stop();
});

function connect() {
  const socket = socketClusterClient.create({ hostname: cluster.hostname, port: cluster.port, path: cluster.path });
  sockets.push(socket);
  // Rolling restarts and drains close sockets: the errors that follow are expected.
  (async () => { for await (const _ of socket.listener('error')) { /* expected */ } })();
  return socket;
}

// The figures a chart shows now: its latest values by series, its maximum, its point count.
async function chart(page, id) {
  return page.$eval(`#${id}`, (el) => ({
    last: JSON.parse(el.dataset.last || '{}'),
    max: Number(el.dataset.max || 0),
    points: Number(el.dataset.points || 0),
    ys: [...el.querySelectorAll('polyline')].map((p) => new Set(p.getAttribute('points').split(' ').map((xy) => xy.split(',')[1])).size),
  }));
}

async function pagePids(page, role) {
  return page.$$eval(`#members tbody tr[data-role="${role}"]`, (rows) =>
    Object.fromEntries(rows.map((r) => [r.dataset.id, { pid: r.dataset.pid, state: r.dataset.state }])));
}

test('the admin page shows the cluster live and drives a rolling restart and a drain', async () => {
  assert.ok(fs.existsSync(CHROMIUM), `${CHROMIUM} is missing (apt-get install chromium)`);
  fs.mkdirSync(SHOTS, { recursive: true });
  cluster = await startCluster({
    SC_CLUSTER__WORKERS: '2',
    SC_CLUSTER__BROKERS: '2',
    SC_MASTER__HEALTH_INTERVAL: '250ms',
  });
  assert.match(cluster.pageLink, /^http:\/\/127\.0\.0\.1:\d+\/#token=[0-9a-f]{64}$/);

  browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ['--no-sandbox'] });
  const page = await browser.newPage({ viewport: { width: 1280, height: 1100 } });
  const problems = [];
  page.on('console', (msg) => { if (msg.type() === 'error') problems.push(`console: ${msg.text()}`); });
  page.on('pageerror', (err) => problems.push(`page error: ${err.message}`));

  // Loaded from the printed link: the token leaves the address bar, the members arrive.
  await page.goto(cluster.pageLink);
  const expected = (await status(cluster)).members;
  assert.equal(expected.length, 5, 'a balancer, 2 workers, 2 brokers');
  await page.waitForFunction((n) => document.querySelectorAll('#members tbody tr').length === n,
    expected.length, { timeout: 20000 });
  assert.equal(await page.evaluate(() => location.hash), '', 'the token is taken out of the URL');
  const shown = await page.$$eval('#members tbody tr', (rows) => rows.map((r) => `${r.dataset.role}/${r.dataset.id}`));
  assert.deepEqual(shown.sort(), expected.map((m) => `${m.role}/${m.id}`).sort(), 'every member is shown');
  await page.waitForFunction(() => document.getElementById('live').dataset.state === 'on', null, { timeout: 10000 });
  await page.screenshot({ path: path.join(SHOTS, 'idle.png'), fullPage: true });

  // Load: subscribers on one channel, a publisher; the charts must move.
  const before = await chart(page, 'chart-messages');
  const subscribed = [];
  for (let i = 0; i < SUBSCRIBERS; i++) {
    const channel = connect().subscribe('admin-page-load');
    (async () => { for await (const _ of channel) { /* received */ } })();
    subscribed.push(channel.listener('subscribe').once());
  }
  await Promise.all(subscribed);
  const publisher = connect();
  await publisher.listener('connect').once();
  publishing = true;
  (async () => {
    for (let n = 0; publishing; n++) {
      publisher.transmitPublish('admin-page-load', n);
      await new Promise((r) => setTimeout(r, PUBLISH_EVERY_MS));
    }
  })();
  const moved = await eventually(async () => {
    const messages = await chart(page, 'chart-messages');
    const connections = await chart(page, 'chart-connections');
    const broker = await chart(page, 'chart-broker');
    const ok = messages.last.messages_out > SUBSCRIBERS && messages.last.messages_in > 1
      && messages.ys.every((distinct) => distinct > 1)
      && connections.last.worker_connections >= SUBSCRIBERS + 1
      && broker.last.publishes > 1;
    return ok ? { messages, connections, broker } : undefined;
  }, 45000, 'the charts to move under load (members must serve sc.metrics.v1 Scrape)').catch(async (e) => {
    const note = await page.textContent('#figures-note');
    throw new Error(`${e.message}; messages chart ${JSON.stringify(await chart(page, 'chart-messages'))}; page says "${note}"`);
  });
  assert.equal(before.max, 0, 'no messages before the load');
  console.log('charts under load:', JSON.stringify({
    messages: moved.messages.last, connections: moved.connections.last, broker: moved.broker.last,
  }));
  await page.screenshot({ path: path.join(SHOTS, 'load.png'), fullPage: true });
  if (process.env.SC_ADMIN_PAGE_DOCS === '1') {
    await page.screenshot({ path: path.join(root, 'docs/admin-page.png'), fullPage: true });
  }

  // The rolling restart button: completed, and the page shows new worker pids.
  const oldWorkers = await pagePids(page, 'worker');
  assert.equal(Object.keys(oldWorkers).length, 2);
  const startedAt = Date.now();
  await page.click('#rolling-restart');
  await page.waitForSelector('#rolling-state[data-state="done"]', { timeout: 120000 });
  await eventually(async () => {
    const now = await pagePids(page, 'worker');
    return Object.entries(now).every(([id, w]) => w.pid && w.pid !== oldWorkers[id].pid && w.state === 'healthy')
      || undefined;
  }, 20000, 'the page to show every worker with a new pid, healthy');
  console.log(`rolling restart from the page: ${Date.now() - startedAt} ms;`,
    await page.textContent('#rolling-state'));
  await page.screenshot({ path: path.join(SHOTS, 'rolling-restart.png'), fullPage: true });

  // Drain broker-1 from its button, then start it again.
  await page.click('#members tr[data-id="broker-1"] button.drain');
  await page.waitForSelector('#members tr[data-id="broker-1"][data-state="drained"]', { timeout: 30000 });
  const drained = (await status(cluster)).members.find((m) => m.id === 'broker-1');
  assert.equal(drained.state, 'drained');
  await page.screenshot({ path: path.join(SHOTS, 'drained.png'), fullPage: true });
  await page.click('#members tr[data-id="broker-1"] button.undrain');
  await page.waitForSelector('#members tr[data-id="broker-1"][data-state="healthy"]', { timeout: 30000 });

  assert.deepEqual(problems, [], 'no console error and no page error');
});
