// The stock socketcluster-client v20 (protocol v2) against a whole cluster through the balancer.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import socketClusterClient from 'sc-client-20';
import { startCluster, withTimeout } from './cluster.js';

let cluster;
const clients = [];

before(async () => {
  cluster = await startCluster({ SC_CLUSTER__WORKERS: '2', SC_CLUSTER__BROKERS: '1' });
});

after(async () => {
  for (const c of clients) c.disconnect();
  await cluster?.stop();
});

// A v20 client from a given loopback source address (the balancer hashes by client IP).
function connect(localAddress = '127.0.0.1') {
  const socket = socketClusterClient.create({
    hostname: cluster.hostname,
    port: cluster.port,
    path: cluster.path,
    autoReconnect: false,
    wsOptions: { localAddress },
  });
  clients.push(socket);
  return socket;
}

async function firstMessage(channel, ms = 5000) {
  const iterator = channel[Symbol.asyncIterator]();
  const { value } = await withTimeout(iterator.next(), ms, `a message on ${channel.name}`);
  return value;
}

test('connects, subscribes, publishes and receives its own message', async () => {
  const socket = connect();
  const status = await withTimeout(socket.listener('connect').once(), 5000, 'connect');
  assert.equal(typeof status.id, 'string');
  assert.equal(status.id.length, 20);
  assert.equal(status.pingTimeout, 20000);
  assert.equal(status.isAuthenticated, false);

  const channel = socket.subscribe('news');
  await withTimeout(channel.listener('subscribe').once(), 5000, 'subscribe');
  const received = firstMessage(channel);
  await socket.invokePublish('news', { headline: 'hi', n: 1 });
  assert.deepEqual(await received, { headline: 'hi', n: 1 });
});

test('transmitPublish (no cid) reaches subscribers too', async () => {
  const socket = connect();
  const channel = socket.subscribe('transmitted');
  await withTimeout(channel.listener('subscribe').once(), 5000, 'subscribe');
  const received = firstMessage(channel);
  socket.transmitPublish('transmitted', 'plain string');
  assert.equal(await received, 'plain string');
});

test('an invoke nobody handles gets an error, not silence', async () => {
  const socket = connect();
  await withTimeout(socket.listener('connect').once(), 5000, 'connect');
  const started = Date.now();
  await assert.rejects(socket.invoke('nobodyHandlesThis', { a: 1 }), (err) => {
    assert.notEqual(err.name, 'TimeoutError');
    return true;
  });
  assert.ok(Date.now() - started < 5000, 'answered, not timed out');
});

test('subscribers on other workers receive publishes (through the broker)', async () => {
  // Many source addresses: with two workers, rendezvous hashing spreads them over both.
  const sockets = [];
  for (let i = 2; i < 12; i++) sockets.push(connect(`127.0.0.${i}`));
  const channels = sockets.map((s) => s.subscribe('everyone'));
  await Promise.all(channels.map((c) => withTimeout(c.listener('subscribe').once(), 5000, 'subscribe')));
  const received = channels.map((c) => firstMessage(c));
  await sockets[0].invokePublish('everyone', { from: 0 });
  for (const message of await Promise.all(received)) assert.deepEqual(message, { from: 0 });
});

test('unsubscribe stops delivery', async () => {
  const socket = connect();
  const channel = socket.subscribe('leaving');
  await withTimeout(channel.listener('subscribe').once(), 5000, 'subscribe');
  socket.unsubscribe('leaving');
  const other = connect('127.0.0.50');
  const otherChannel = other.subscribe('leaving');
  await withTimeout(otherChannel.listener('subscribe').once(), 5000, 'subscribe');
  const seen = [];
  (async () => { for await (const m of socket.channel('leaving')) seen.push(m); })();
  const received = firstMessage(otherChannel);
  await other.invokePublish('leaving', 'after');
  assert.equal(await received, 'after');
  assert.deepEqual(seen, []);
});
