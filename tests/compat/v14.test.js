// The stock socketcluster-client v14 (protocol v1) against a whole cluster running the chat
// example app with protocol_version = auto, through the balancer.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import sc14 from 'sc-client-14';
import { startCluster, chatWorker, daemonsOf, workerFor, withTimeout, eventually } from './cluster.js';

let cluster;
const clients = [];
const T = 5000;

before(async () => {
  cluster = await startCluster({
    SC_CLUSTER__WORKERS: '2',
    SC_WORKER__COMMAND: chatWorker,
    SC_WORKER__PING_INTERVAL: '1s',
    SC_WORKER__PING_TIMEOUT: '4s',
    SC_WORKER__MAX_PAYLOAD: '64KiB',
  });
});

after(async () => {
  for (const c of clients) { c.off(); c.on('error', () => {}); c.disconnect(); }
  await cluster?.stop();
});

// A v14 client; v14 hands its options to `ws`, so localAddress picks the source address.
// Do not pass protocolVersion to v14 (it would reach `ws` as a subprotocol). multiplex: false,
// or v14's create() hands back the existing socket for the same URL.
function connect({ localAddress = '127.0.0.1', ...options } = {}) {
  const socket = sc14.create({
    hostname: cluster.hostname,
    port: cluster.port,
    autoReconnect: false,
    multiplex: false,
    localAddress,
    ...options,
  });
  socket.errors = [];
  socket.on('error', (err) => socket.errors.push(err)); // v14 throws on an unhandled 'error'
  clients.push(socket);
  return socket;
}

const event = (emitter, name, ms = T) =>
  withTimeout(new Promise((resolve) => emitter.once(name, (...args) => resolve(args))), ms, name);

const emit = (socket, name, data) =>
  new Promise((resolve, reject) => socket.emit(name, data, (err, res) => (err ? reject(err) : resolve(res))));

async function connected(socket) {
  if (socket.state !== 'open') await event(socket, 'connect');
  return socket;
}

async function subscribed(socket, name, options) {
  const channel = socket.subscribe(name, options);
  if (channel.state !== 'subscribed') await event(channel, 'subscribe');
  return channel;
}

const nextMessage = (channel, ms = T) =>
  withTimeout(new Promise((resolve) => {
    const handler = (data) => { channel.unwatch(handler); resolve(data); };
    channel.watch(handler);
  }), ms, `a message on ${channel.name}`);

test('handshake: id, pingTimeout from config, not authenticated', async () => {
  const socket = connect();
  const [status] = await event(socket, 'connect');
  assert.equal(status.id.length, 20);
  assert.equal(status.pingTimeout, 4000);
  assert.equal(status.isAuthenticated, false);
});

test('subscribe, publish with and without a callback, echo to the publisher', async () => {
  const socket = await connected(connect());
  const channel = await subscribed(socket, 'news');
  let received = nextMessage(channel);
  await new Promise((resolve, reject) => socket.publish('news', { n: 1 }, (err) => (err ? reject(err) : resolve())));
  assert.deepEqual(await received, { n: 1 });
  received = nextMessage(channel);
  socket.publish('news', 'no callback');
  assert.equal(await received, 'no callback');
});

test('v1 clients and v2 clients share channels', async () => {
  const socket = await connected(connect({ localAddress: '127.0.0.20' }));
  const channel = await subscribed(socket, 'mixed');
  const received = nextMessage(channel);
  const { default: sc20 } = await import('sc-client-20');
  const v20 = sc20.create({ hostname: cluster.hostname, port: cluster.port, autoReconnect: false, wsOptions: { localAddress: '127.0.0.21' } });
  try {
    await v20.invokePublish('mixed', { from: 'v20' });
    assert.deepEqual(await received, { from: 'v20' });
  } finally {
    v20.disconnect();
  }
});

test('emit with a callback: procedures answer, unknown ones error at once', async () => {
  const socket = await connected(connect());
  assert.deepEqual(await emit(socket, 'echo', { n: 2 }), { n: 2 });
  const started = Date.now();
  await assert.rejects(emit(socket, 'nobodyHandlesThis', 1), (err) => err.name === 'InvalidActionError');
  assert.ok(Date.now() - started < 2000);
});

test('login sets a token; private channels need it; waitForAuth waits for it', async () => {
  const socket = await connected(connect());
  const refused = socket.subscribe('private/v14');
  const [error] = await event(refused, 'subscribeFail');
  assert.equal(error.name, 'SubscribeBlocked');
  const waiting = socket.subscribe('private/vic', { waitForAuth: true });
  const authenticated = event(socket, 'authenticate');
  assert.deepEqual(await emit(socket, 'login', { username: 'vic' }), { username: 'vic' });
  await authenticated;
  assert.equal(socket.authState, 'authenticated');
  assert.equal(socket.getAuthToken().username, 'vic');
  if (waiting.state !== 'subscribed') await event(waiting, 'subscribe');
});

test('the token is presented again on reconnect, to either worker', async () => {
  const first = await connected(connect({ localAddress: '127.0.0.30' }));
  await emit(first, 'login', { username: 'wendy' });
  const token = first.signedAuthToken;
  const second = connect({ localAddress: '127.0.0.31', autoConnect: false });
  await new Promise((resolve) => second.auth.saveToken(second.authTokenName, token, {}, resolve));
  second.connect();
  const [status] = await event(second, 'connect');
  assert.equal(status.isAuthenticated, true);
  assert.deepEqual((await emit(second, 'whoami')).username, 'wendy');
});

test('a bad token in the handshake: authError and the token is removed', async () => {
  const socket = connect({ autoConnect: false });
  await new Promise((resolve) => socket.auth.saveToken(socket.authTokenName, 'not.a.jwt', {}, resolve));
  socket.connect();
  const [status] = await event(socket, 'connect');
  assert.equal(status.isAuthenticated, false);
  assert.equal(status.authError.name, 'AuthTokenInvalidError');
  await eventually(() => new Promise((resolve) => socket.auth.loadToken(socket.authTokenName, (err, t) => resolve(t == null))), T, 'token removed');
});

test('authenticate() with good and bad tokens', async () => {
  const issuer = await connected(connect());
  await emit(issuer, 'login', { username: 'xena' });
  const socket = await connected(connect());
  const status = await new Promise((resolve, reject) => socket.authenticate(issuer.signedAuthToken, (err, s) => (err ? reject(err) : resolve(s))));
  assert.equal(status.isAuthenticated, true);
  await assert.rejects(
    new Promise((resolve, reject) => socket.authenticate('bad.token.here', (err, s) => (err ? reject(err) : resolve(s)))),
    (err) => err.name === 'AuthTokenInvalidError',
  );
  assert.equal(socket.authState, 'unauthenticated');
});

test('deauthenticate from either side', async () => {
  const socket = await connected(connect());
  await emit(socket, 'login', { username: 'yuri' });
  await new Promise((resolve) => socket.deauthenticate(resolve));
  assert.equal(await emit(socket, 'whoami'), null);
  await emit(socket, 'login', { username: 'yuri' });
  const removed = event(socket, 'deauthenticate');
  await emit(socket, 'logout');
  await removed;
  assert.equal(socket.authState, 'unauthenticated');
});

test('kickOut, server invoke and server transmit', async () => {
  const socket = await connected(connect());
  const channel = await subscribed(socket, 'kicked14');
  const kicked = event(socket, 'kickOut');
  await emit(socket, 'kick', { channel: 'kicked14', message: 'out' });
  const [message, name] = await kicked;
  assert.deepEqual([message, name], ['out', 'kicked14']);
  assert.equal(channel.state, 'unsubscribed');

  socket.on('serverAsk', (data, respond) => respond(null, { a: data.q * 2 }));
  assert.deepEqual(await emit(socket, 'ask', { event: 'serverAsk', data: { q: 21 } }), { a: 42 });
  const pushed = event(socket, 'serverPush');
  await emit(socket, 'tell', { event: 'serverPush', data: { x: 2 } });
  assert.deepEqual((await pushed)[0], { x: 2 });
  const pong = event(socket, 'pong');
  socket.emit('ping-me', { t: 9 });
  assert.deepEqual((await pong)[0], { t: 9 });
});

test('server disconnect: the code and the reason arrive (v1 #disconnect)', async () => {
  const socket = await connected(connect());
  const closed = event(socket, 'disconnect');
  socket.emit('bye', { code: 4567, reason: 'custom reason' }, () => {});
  const [code, reason] = await closed;
  assert.equal(code, 4567);
  assert.equal(reason, 'custom reason');
});

test('pings ("#1") keep the client connected; it disconnects cleanly', async () => {
  const socket = await connected(connect());
  const raws = [];
  socket.on('raw', (r) => raws.push(r));
  await new Promise((r) => setTimeout(r, 5500));
  assert.equal(socket.state, 'open');
  assert.ok(raws.every((r) => r === ''), 'at most the v2 ping before the socket locked to v1');
  assert.ok(raws.length <= 1, `${raws.length} v2 pings seen`);
  assert.deepEqual(await emit(socket, 'echo', 3), 3);
});

test('a message over max_payload closes that socket with 1009', async () => {
  const socket = await connected(connect());
  const closed = event(socket, 'close');
  socket.emit('big', 'x'.repeat(100 * 1024));
  assert.equal((await closed)[0], 1009);
});

test('after its worker is killed the client reconnects and resubscribes by itself', async () => {
  const socket = connect({ localAddress: '127.0.0.80', autoReconnect: true, autoReconnectOptions: { initialDelay: 100, randomness: 100, maxDelay: 500 } });
  await connected(socket);
  const channel = await subscribed(socket, 'survivors14');
  const workerId = await workerFor(cluster, '127.0.0.80');
  const worker = daemonsOf(cluster.child.pid).find((d) => d.id === workerId);
  assert.ok(worker, `worker ${workerId} found`);
  const reconnected = event(socket, 'connect', 15000);
  process.kill(worker.pid, 'SIGKILL');
  await reconnected;
  if (channel.state !== 'subscribed') await event(channel, 'subscribe', 10000);
  const publisher = await connected(connect({ localAddress: '127.0.0.81' }));
  const received = nextMessage(channel, 10000);
  await eventually(() => new Promise((resolve) => publisher.publish('survivors14', 'back', (err) => resolve(!err))), 10000, 'a publish after the restart');
  assert.equal(await received, 'back');
});

test('app hooks: a handshake rejected by the app closes with its code (data.code for v14)', async () => {
  const issuer = await connected(connect());
  await emit(issuer, 'login', { username: 'banned' });
  const socket = connect({ autoConnect: false });
  await new Promise((resolve) => socket.auth.saveToken(socket.authTokenName, issuer.signedAuthToken, {}, resolve));
  const closed = event(socket, 'close');
  socket.connect();
  const [code] = await closed;
  assert.equal(code, 4403);
});
