// A rolling restart (SIGUSR2 to sc-master) under load, seen by the stock v20 client: subscribers
// spread over every worker, a publisher at a fixed rate, and what each subscriber lost.
//
// Prints, per run: the longest time a subscriber was away (disconnect to subscribed again), the
// longest gap between two messages a subscriber received, and the messages it missed. The target
// of the issue: every client back within 2 seconds.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import socketClusterClient from 'sc-client-20';
import { startCluster, admin, eventually, withTimeout } from './cluster.js';

// Defaults keep the test quick; SC_ROLLING_WORKERS / SC_ROLLING_SUBSCRIBERS measure bigger runs.
const WORKERS = Number(process.env.SC_ROLLING_WORKERS || 3);
const SUBSCRIBERS = Number(process.env.SC_ROLLING_SUBSCRIBERS || 30);
const PUBLISH_EVERY_MS = 10;
const TARGET_MS = 2000;

let cluster;
const sockets = [];

after(async () => {
  for (const s of sockets) s.disconnect();
  await cluster?.stop();
});

function connect(localAddress) {
  const socket = socketClusterClient.create({
    hostname: cluster.hostname,
    port: cluster.port,
    path: cluster.path,
    wsOptions: { localAddress },
    // The stock defaults: autoReconnect on, 10-20 s backoff except after 4000/4001/1005.
  });
  sockets.push(socket);
  // The v20 client emits errors for every abnormal close; they are expected here.
  (async () => { for await (const _ of socket.listener('error')) { /* expected */ } })();
  return socket;
}

test('SIGUSR2 replaces every worker one at a time; every v20 client is back within 2 s', async () => {
  cluster = await startCluster({ SC_CLUSTER__WORKERS: String(WORKERS), SC_MASTER__HEALTH_INTERVAL: '250ms' });

  const subscribers = [];
  for (let i = 0; i < SUBSCRIBERS; i++) {
    // Distinct source addresses, so the balancer's client-IP hashing spreads them.
    const socket = connect(`127.0.${1 + Math.floor(i / 250)}.${(i % 250) + 2}`);
    const stats = { socket, received: [], lastAt: null, maxGap: 0, away: [], disconnectedAt: null };
    const channel = socket.subscribe('ticks');
    (async () => {
      for await (const n of channel) {
        const now = Date.now();
        if (stats.lastAt !== null) stats.maxGap = Math.max(stats.maxGap, now - stats.lastAt);
        stats.lastAt = now;
        stats.received.push(n);
      }
    })();
    (async () => {
      for await (const _ of socket.listener('disconnect')) stats.disconnectedAt = Date.now();
    })();
    (async () => {
      for await (const _ of channel.listener('subscribe')) {
        if (stats.disconnectedAt !== null) {
          stats.away.push(Date.now() - stats.disconnectedAt);
          stats.disconnectedAt = null;
        }
      }
    })();
    subscribers.push({ stats, channel });
  }
  await Promise.all(subscribers.map(({ channel }) =>
    withTimeout(channel.listener('subscribe').once(), 10000, 'subscribe')));

  const publisher = connect('127.0.200.1');
  await withTimeout(publisher.listener('connect').once(), 5000, 'publisher connect');
  let seq = 0;
  let publishing = true;
  const publishLoop = (async () => {
    while (publishing) {
      seq += 1;
      publisher.transmitPublish('ticks', seq);
      await new Promise((r) => setTimeout(r, PUBLISH_EVERY_MS));
    }
  })();

  // Steady state first, then the rolling restart.
  await eventually(() => subscribers.every(({ stats }) => stats.received.length > 150) || undefined,
    10000, 'every subscriber receiving');
  const before = (await admin(cluster, '/status')).body;
  const workerPids = Object.fromEntries(before.members.filter((m) => m.role === 'worker').map((m) => [m.id, m.pid]));
  const startedAt = Date.now();
  cluster.child.kill('SIGUSR2');
  await eventually(async () => {
    const { body } = await admin(cluster, '/status');
    const workers = body.members.filter((m) => m.role === 'worker');
    const replaced = workers.every((w) => w.pid !== workerPids[w.id] && w.state === 'healthy');
    return (replaced && !body.rolling_restart.running) || undefined;
  }, 60000, 'every worker replaced');
  const restartMs = Date.now() - startedAt;
  // Let everyone settle and see fresh messages.
  const lastSeq = seq;
  await eventually(() => subscribers.every(({ stats }) => stats.received.at(-1) > lastSeq + 150) || undefined,
    10000, 'every subscriber receiving after the restart');
  publishing = false;
  await publishLoop;

  const log = (await admin(cluster, '/log')).body.entries.filter((e) => /replaced|rolling restart/.test(e.message));
  const rows = subscribers.map(({ stats }) => {
    const first = stats.received[0];
    const last = stats.received.at(-1);
    const seen = new Set(stats.received);
    let missed = 0;
    for (let n = first; n <= last; n++) if (!seen.has(n)) missed += 1;
    return { reconnects: stats.away.length, maxAwayMs: Math.max(0, ...stats.away), maxGapMs: stats.maxGap, missed };
  });
  const moved = rows.filter((r) => r.reconnects > 0);
  const summary = {
    workers: WORKERS,
    subscribers: SUBSCRIBERS,
    publishEveryMs: PUBLISH_EVERY_MS,
    published: seq,
    rollingRestartMs: restartMs,
    subscribersReconnected: moved.length,
    maxAwayMs: Math.max(...rows.map((r) => r.maxAwayMs)),
    maxGapMs: Math.max(...rows.map((r) => r.maxGapMs)),
    maxMissed: Math.max(...rows.map((r) => r.missed)),
    totalMissed: rows.reduce((a, r) => a + r.missed, 0),
  };
  console.log('rolling restart under load:', JSON.stringify(summary));
  for (const entry of log) console.log('  master:', entry.message);

  assert.equal(moved.length, SUBSCRIBERS, 'every subscriber was on a restarted worker');
  assert.ok(summary.maxAwayMs < TARGET_MS, `a client was away ${summary.maxAwayMs} ms`);
  assert.ok(summary.maxGapMs < TARGET_MS, `a subscriber saw a ${summary.maxGapMs} ms gap`);
});
