// wss:// with the stock socketcluster-client v20: the balancer ends TLS with a certificate from
// config (a test CA made at test time by sc-test-certs, with rcgen), the worker learns that the
// client came over TLS and from which address, and a certificate swapped on disk plus SIGHUP to
// the master is served to new connections while the old ones stay up.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import socketClusterClient from 'sc-client-20';
import { startCluster, chatWorker, binDir, withTimeout, eventually } from './cluster.js';

const T = 5000;
let cluster;
let dir;
const clients = [];

function makeCerts(into, name) {
  execFileSync(path.join(binDir, 'sc-test-certs'), [into, name]);
  return fs.readFileSync(path.join(into, 'ca.pem'));
}

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sc-tls-'));
  makeCerts(dir, 'first');
  cluster = await startCluster({
    SC_CLUSTER__WORKERS: '2',
    SC_WORKER__COMMAND: chatWorker,
    SC_BALANCER__TLS_CERT: path.join(dir, 'cert.pem'),
    SC_BALANCER__TLS_KEY: path.join(dir, 'key.pem'),
  });
});

after(async () => {
  for (const c of clients) c.disconnect();
  await cluster?.stop();
  fs.rmSync(dir, { recursive: true, force: true });
});

function connect(ca, localAddress = '127.0.0.1') {
  const socket = socketClusterClient.create({
    hostname: cluster.hostname,
    port: cluster.port,
    path: cluster.path,
    secure: true,
    autoReconnect: false,
    wsOptions: { ca, localAddress },
  });
  clients.push(socket);
  return socket;
}

const once = (listener, what, ms = T) => withTimeout(listener.once(), ms, what);

async function roundTrip(socket, channelName, data) {
  const channel = socket.channel(channelName);
  const received = withTimeout(channel[Symbol.asyncIterator]().next(), T, `a message on ${channelName}`);
  await socket.invokePublish(channelName, data);
  return (await received).value;
}

test('wss:// with a certificate from config; the worker knows TLS and the client address', async () => {
  assert.match(cluster.url, /^wss:\/\//);
  const ca = fs.readFileSync(path.join(dir, 'ca.pem'));
  const socket = connect(ca, '127.0.0.7');
  await once(socket.listener('connect'), 'connect over wss');
  const peer = await socket.invoke('peer');
  assert.equal(peer.tls, true);
  assert.equal(peer.remoteAddress, '127.0.0.7');
  const channel = socket.subscribe('secure');
  await once(channel.listener('subscribe'), 'subscribe');
  assert.deepEqual(await roundTrip(socket, 'secure', { over: 'tls' }), { over: 'tls' });
});

test('a certificate swapped on disk plus SIGHUP reaches new connections; old ones stay up', async () => {
  const firstCa = fs.readFileSync(path.join(dir, 'ca.pem'));
  const old = connect(firstCa, '127.0.0.8');
  await once(old.listener('connect'), 'old connect');
  const oldChannel = old.subscribe('reload');
  await once(oldChannel.listener('subscribe'), 'old subscribe');

  const next = fs.mkdtempSync(path.join(os.tmpdir(), 'sc-tls-next-'));
  const secondCa = makeCerts(next, 'second');
  for (const file of ['key.pem', 'cert.pem']) fs.renameSync(path.join(next, file), path.join(dir, file));
  fs.rmSync(next, { recursive: true, force: true });
  cluster.child.kill('SIGHUP');

  const fresh = await eventually(async () => {
    const socket = connect(secondCa, '127.0.0.9');
    try {
      await once(socket.listener('connect'), 'connect with the new CA', 2000);
      return socket;
    } catch {
      socket.disconnect();
      return undefined;
    }
  }, 10000, 'a connection that trusts only the new CA');
  assert.equal((await fresh.invoke('peer')).tls, true);

  assert.equal(old.state, 'open', 'the old connection is still up');
  assert.equal(await roundTrip(old, 'reload', 'after the reload'), 'after the reload');
});
