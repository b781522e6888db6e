// The stock socketcluster-client v20 (protocol v2) against a whole cluster running the chat
// example app (examples/chat) with protocol_version = auto, through the balancer.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import socketClusterClient from 'sc-client-20';
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
    SC_WORKER__SOCKET_CHANNEL_LIMIT: '20',
  });
});

after(async () => {
  for (const c of clients) c.disconnect();
  await cluster?.stop();
});

// A v20 client from a given loopback source address (the balancer hashes by client IP).
function connect({ localAddress = '127.0.0.1', ...options } = {}) {
  const socket = socketClusterClient.create({
    hostname: cluster.hostname,
    port: cluster.port,
    path: cluster.path,
    autoReconnect: false,
    wsOptions: { localAddress },
    ...options,
  });
  clients.push(socket);
  return socket;
}

const once = (listener, what, ms = T) => withTimeout(listener.once(), ms, what);

async function subscribed(socket, name, options) {
  const channel = socket.subscribe(name, options);
  await once(channel.listener('subscribe'), `subscribe ${name}`);
  return channel;
}

async function firstMessage(channel, ms = T) {
  const { value } = await withTimeout(channel[Symbol.asyncIterator]().next(), ms, `a message on ${channel.name}`);
  return value;
}

test('handshake: id, pingTimeout from config, not authenticated', async () => {
  const socket = connect();
  const status = await once(socket.listener('connect'), 'connect');
  assert.equal(typeof status.id, 'string');
  assert.equal(status.id.length, 20);
  assert.equal(status.pingTimeout, 4000);
  assert.equal(status.isAuthenticated, false);
  assert.equal(socket.authState, 'unauthenticated');
});

test('subscribe, invokePublish and transmitPublish, echo to the publisher', async () => {
  const socket = connect();
  const channel = await subscribed(socket, 'news');
  let received = firstMessage(channel);
  await socket.invokePublish('news', { headline: 'hi', n: 1 });
  assert.deepEqual(await received, { headline: 'hi', n: 1 });
  received = firstMessage(channel);
  socket.transmitPublish('news', 'plain string');
  assert.equal(await received, 'plain string');
});

test('binary data travels in the base64 envelope', async () => {
  const socket = connect();
  const channel = await subscribed(socket, 'binary');
  const received = firstMessage(channel);
  await socket.invokePublish('binary', { bin: Buffer.from('ab') });
  assert.deepEqual(await received, { bin: { base64: true, data: 'YWI=' } });
});

test('subscribers on every worker receive a publish (through the broker)', async () => {
  const sockets = [];
  for (let i = 2; i < 12; i++) sockets.push(connect({ localAddress: `127.0.0.${i}` }));
  const workers = new Set(await Promise.all(sockets.map((_, i) => workerFor(cluster, `127.0.0.${i + 2}`))));
  assert.equal(workers.size, 2, 'the clients are spread over both workers');
  const channels = await Promise.all(sockets.map((s) => subscribed(s, 'everyone')));
  const received = channels.map((c) => firstMessage(c));
  await sockets[0].invokePublish('everyone', { from: 0 });
  for (const message of await Promise.all(received)) assert.deepEqual(message, { from: 0 });
});

test('unsubscribe stops delivery', async () => {
  const socket = connect();
  await subscribed(socket, 'leaving');
  socket.unsubscribe('leaving');
  const other = connect({ localAddress: '127.0.0.50' });
  const otherChannel = await subscribed(other, 'leaving');
  const seen = [];
  (async () => { for await (const m of socket.channel('leaving')) seen.push(m); })();
  const received = firstMessage(otherChannel);
  await other.invokePublish('leaving', 'after');
  assert.equal(await received, 'after');
  await new Promise((r) => setTimeout(r, 100));
  assert.deepEqual(seen, []);
});

test('invoke: a procedure answers, an unknown one errors at once', async () => {
  const socket = connect();
  assert.deepEqual(await socket.invoke('echo', { n: 1, s: 'x' }), { n: 1, s: 'x' });
  const started = Date.now();
  await assert.rejects(socket.invoke('nobodyHandlesThis', 1), (err) => err.name === 'InvalidActionError');
  assert.ok(Date.now() - started < 2000);
  await assert.rejects(socket.invoke('login', { username: 5 }), (err) => err.name === 'InvalidArgumentsError');
});

test('login sets a token; private channels need it; waitForAuth waits for it', async () => {
  const socket = connect();
  const refused = socket.subscribe('private/room');
  const { error } = await once(refused.listener('subscribeFail'), 'subscribeFail');
  assert.equal(error.name, 'SubscribeBlocked');

  const waiting = socket.subscribe('private/alice', { waitForAuth: true });
  await new Promise((r) => setTimeout(r, 200));
  assert.equal(waiting.state, 'pending', 'held by the client until authenticated');

  const authenticated = once(socket.listener('authenticate'), 'authenticate');
  assert.deepEqual(await socket.invoke('login', { username: 'alice' }), { username: 'alice' });
  const { authToken } = await authenticated;
  assert.equal(authToken.username, 'alice');
  assert.equal(typeof authToken.iat, 'number');
  assert.equal(authToken.exp - authToken.iat, 86400, 'default expiry');
  assert.equal(socket.authState, 'authenticated');
  await once(waiting.listener('subscribe'), 'waitForAuth subscribe');
  assert.deepEqual(await socket.invoke('whoami'), authToken);
});

test('a token signed by one worker is valid on the other, in the handshake', async () => {
  const first = connect({ localAddress: '127.0.0.2' });
  await first.invoke('login', { username: 'bob' });
  const token = first.signedAuthToken;
  let other;
  for (let i = 3; i < 30; i++) {
    if (await workerFor(cluster, `127.0.0.${i}`) !== await workerFor(cluster, '127.0.0.2')) { other = `127.0.0.${i}`; break; }
  }
  assert.ok(other, 'found an address on the other worker');
  const second = connect({ localAddress: other, autoConnect: false });
  await second.auth.saveToken(second.authTokenName, token);
  second.connect();
  const status = await once(second.listener('connect'), 'connect');
  assert.equal(status.isAuthenticated, true);
  assert.equal(second.authToken.username, 'bob');
});

test('a bad token in the handshake: authError, token removed, still connected', async () => {
  const socket = connect({ autoConnect: false });
  await socket.auth.saveToken(socket.authTokenName, 'not.a.jwt');
  socket.connect();
  const status = await once(socket.listener('connect'), 'connect');
  assert.equal(status.isAuthenticated, false);
  assert.equal(status.authError.name, 'AuthTokenInvalidError');
  await eventually(async () => (await socket.auth.loadToken(socket.authTokenName)) == null, T, 'token removed');
  assert.equal(socket.state, 'open');
});

test('authenticate(): a good token authenticates, a bad one is refused', async () => {
  const issuer = connect();
  await issuer.invoke('login', { username: 'carol' });
  const socket = connect();
  await once(socket.listener('connect'), 'connect');
  const status = await socket.authenticate(issuer.signedAuthToken);
  assert.equal(status.isAuthenticated, true);
  assert.equal(socket.authToken.username, 'carol');
  await assert.rejects(socket.authenticate('bad.token.here'), (err) => err.name === 'AuthTokenInvalidError');
  assert.equal(socket.authState, 'unauthenticated');
});

test('deauthenticate from either side', async () => {
  const socket = connect();
  await socket.invoke('login', { username: 'dave' });
  await socket.deauthenticate();
  assert.equal(await socket.invoke('whoami'), null, 'the server dropped the token');
  await socket.invoke('login', { username: 'dave' });
  const removed = once(socket.listener('deauthenticate'), 'deauthenticate');
  await socket.invoke('logout');
  await removed;
  assert.equal(socket.authState, 'unauthenticated');
});

test('kickOut: the server unsubscribes a socket and says why', async () => {
  const socket = connect();
  const channel = await subscribed(socket, 'kicked');
  const kicked = once(channel.listener('kickOut'), 'kickOut');
  await socket.invoke('kick', { channel: 'kicked', message: 'bye' });
  const { message } = await kicked;
  assert.equal(message, 'bye');
  assert.equal(channel.state, 'unsubscribed');
});

test('server-to-client invoke and transmit', async () => {
  const socket = connect();
  (async () => {
    for await (const request of socket.procedure('serverAsk')) request.end({ a: request.data.q + 1 });
  })();
  assert.deepEqual(await socket.invoke('ask', { event: 'serverAsk', data: { q: 1 } }), { a: 2 });
  const pushed = withTimeout(socket.receiver('serverPush').once(), T, 'serverPush');
  await socket.invoke('tell', { event: 'serverPush', data: { x: 1 } });
  assert.deepEqual(await pushed, { x: 1 });
  const pong = withTimeout(socket.receiver('pong').once(), T, 'pong');
  socket.transmit('ping-me', { t: 7 });
  assert.deepEqual(await pong, { t: 7 });
});

test('server code publishes through the exchange; publish-in rewrites chat messages', async () => {
  const socket = connect();
  const news = await subscribed(socket, 'announcements');
  let received = firstMessage(news);
  await socket.invoke('announce', { channel: 'announcements', data: { v: 1 } });
  assert.deepEqual(await received, { v: 1 });
  await socket.invoke('login', { username: 'erin' });
  const room = await subscribed(socket, 'chat/room');
  received = firstMessage(room);
  await socket.invokePublish('chat/room', 'hello');
  assert.deepEqual(await received, { from: 'erin', text: 'hello' });
});

test('server disconnect with a custom code and reason', async () => {
  const socket = connect();
  await once(socket.listener('connect'), 'connect');
  const closed = once(socket.listener('close'), 'close');
  socket.invoke('bye', { code: 4567, reason: 'custom reason' }).catch(() => {});
  const { code, reason } = await closed;
  assert.equal(code, 4567);
  assert.equal(reason, 'custom reason');
});

test('pings keep an idle client connected past the ping timeout', async () => {
  const socket = connect();
  await once(socket.listener('connect'), 'connect');
  let closed = false;
  (async () => { for await (const _ of socket.listener('close')) closed = true; })();
  await new Promise((r) => setTimeout(r, 5500));
  assert.equal(closed, false);
  assert.equal(socket.state, 'open');
  assert.deepEqual(await socket.invoke('echo', 1), 1);
});

test('a message over max_payload closes that socket with 1009 and nothing else', async () => {
  const socket = connect();
  await once(socket.listener('connect'), 'connect');
  const bystander = connect({ localAddress: '127.0.0.60' });
  const channel = await subscribed(bystander, 'still-fine');
  const closed = once(socket.listener('close'), 'close');
  socket.transmit('big', 'x'.repeat(100 * 1024));
  assert.equal((await closed).code, 1009);
  const received = firstMessage(channel);
  await bystander.invokePublish('still-fine', 1);
  assert.equal(await received, 1);
});

test('the channel limit refuses the subscription past it with a BrokerError', async () => {
  const socket = connect();
  for (let i = 0; i < 20; i++) await subscribed(socket, `many-${i}`);
  const refused = socket.subscribe('one-too-many');
  const { error } = await once(refused.listener('subscribeFail'), 'subscribeFail');
  assert.equal(error.name, 'BrokerError');
  assert.match(error.message, /channel subscription limit of 20/);
});

test('after its worker is killed the client reconnects and resubscribes by itself', async () => {
  const socket = connect({ localAddress: '127.0.0.70', autoReconnect: true, autoReconnectOptions: { initialDelay: 100, randomness: 100, maxDelay: 500 } });
  const channel = await subscribed(socket, 'survivors');
  const workerId = await workerFor(cluster, '127.0.0.70');
  const worker = daemonsOf(cluster.child.pid).find((d) => d.id === workerId);
  assert.ok(worker, `worker ${workerId} found`);
  const reconnected = once(socket.listener('connect'), 'reconnect', 15000);
  process.kill(worker.pid, 'SIGKILL');
  await reconnected;
  await once(channel.listener('subscribe'), 'resubscribe', 10000);
  const publisher = connect({ localAddress: '127.0.0.71' });
  const received = firstMessage(channel, 10000);
  await eventually(async () => {
    try { await publisher.invokePublish('survivors', 'back'); return true; } catch { return false; }
  }, 10000, 'a publish after the restart');
  assert.equal(await received, 'back');
});

test('app hooks: the upgrade hook answers 401, the handshake hook closes with its code', async () => {
  const refused = connect({ query: { deny: '1' } });
  const { error } = await once(refused.listener('error'), 'upgrade refused');
  assert.ok(error);
  refused.disconnect();

  const issuer = connect();
  await issuer.invoke('login', { username: 'banned' });
  const socket = connect({ autoConnect: false });
  await socket.auth.saveToken(socket.authTokenName, issuer.signedAuthToken);
  const closed = once(socket.listener('close'), 'close');
  socket.connect();
  const { code } = await closed;
  assert.equal(code, 4403);
});
