// Both client lines at once against one cluster with protocol_version = auto: the v20
// conversation of the protocol reference (section 8.4) and its v14 equivalent, run concurrently,
// then the settings that change what clients may do (each on a cluster of its own).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import sc20 from 'sc-client-20';
import sc14 from 'sc-client-14';
import { startCluster, chatWorker, withTimeout } from './cluster.js';

const T = 5000;
const wait = (promise, what, ms = T) => withTimeout(promise, ms, what);
const event14 = (emitter, name) => wait(new Promise((resolve) => emitter.once(name, (...args) => resolve(args))), name);
const emit14 = (socket, name, data) =>
  new Promise((resolve, reject) => socket.emit(name, data, (err, res) => (err ? reject(err) : resolve(res))));

function v20(cluster, localAddress) {
  return sc20.create({ hostname: cluster.hostname, port: cluster.port, autoReconnect: false, wsOptions: { localAddress } });
}

function v14(cluster, localAddress) {
  const socket = sc14.create({ hostname: cluster.hostname, port: cluster.port, autoReconnect: false, multiplex: false, localAddress });
  socket.on('error', () => {});
  return socket;
}

// The section 8.4 conversation, as the v20 client drives it.
async function conversation20(cluster) {
  const socket = v20(cluster, '127.0.0.100');
  try {
    const status = await wait(socket.listener('connect').once(), 'v20 connect');
    assert.equal(status.isAuthenticated, false);
    const news = socket.subscribe('news-84');
    await wait(news.listener('subscribe').once(), 'v20 subscribe news');
    const forbidden = socket.subscribe('private/forbidden');
    assert.equal((await wait(forbidden.listener('subscribeFail').once(), 'v20 subscribeFail')).error.name, 'SubscribeBlocked');
    assert.deepEqual(await socket.invoke('echo', { n: 1 }), { n: 1 });
    socket.transmit('hello', { h: 1 });
    (async () => { for await (const req of socket.procedure('serverAsk')) req.end({ a: 2 }); })();
    assert.deepEqual(await socket.invoke('ask', { event: 'serverAsk', data: { q: 1 } }), { a: 2 });
    const pushed = wait(socket.receiver('serverPush').once(), 'v20 serverPush');
    await socket.invoke('tell', { event: 'serverPush', data: { x: 1 } });
    assert.deepEqual(await pushed, { x: 1 });
    const iterator = news[Symbol.asyncIterator]();
    await socket.invoke('announce', { channel: 'news-84', data: { headline: 'hi', bin: { base64: true, data: 'YWI=' } } });
    assert.deepEqual((await wait(iterator.next(), 'v20 #publish')).value, { headline: 'hi', bin: { base64: true, data: 'YWI=' } });
    const privateChannel = socket.subscribe('private/bob', { waitForAuth: true, data: { z: 1 } });
    await socket.invoke('login', { username: 'bob' });
    await wait(privateChannel.listener('subscribe').once(), 'v20 waitForAuth subscribe');
    await socket.invokePublish('news-84', { from: 'client' });
    assert.deepEqual((await wait(iterator.next(), 'v20 echo')).value, { from: 'client' });
    socket.transmitPublish('news-84', { from: 'client2' });
    assert.deepEqual((await wait(iterator.next(), 'v20 transmitPublish')).value, { from: 'client2' });
    socket.unsubscribe('private/bob');
    const kicked = wait(news.listener('kickOut').once(), 'v20 kickOut');
    await socket.invoke('kick', { channel: 'news-84', message: 'bye' });
    assert.equal((await kicked).message, 'bye');
    const token = socket.signedAuthToken;
    const deauthenticated = wait(socket.listener('deauthenticate').once(), 'v20 deauthenticate');
    await socket.invoke('logout');
    await deauthenticated;
    assert.equal((await socket.authenticate(token)).isAuthenticated, true);
    await socket.deauthenticate();
    const closed = wait(socket.listener('close').once(), 'v20 close');
    socket.invoke('bye', { code: 4567, reason: 'custom reason' }).catch(() => {});
    assert.deepEqual(await closed, { code: 4567, reason: 'custom reason' });
  } finally {
    socket.disconnect();
  }
}

// The same conversation with the v14 client's API.
async function conversation14(cluster) {
  const socket = v14(cluster, '127.0.0.101');
  try {
    const [status] = await event14(socket, 'connect');
    assert.equal(status.isAuthenticated, false);
    const news = socket.subscribe('news-84-v14');
    await event14(news, 'subscribe');
    const forbidden = socket.subscribe('private/forbidden');
    assert.equal((await event14(forbidden, 'subscribeFail'))[0].name, 'SubscribeBlocked');
    assert.deepEqual(await emit14(socket, 'echo', { n: 1 }), { n: 1 });
    socket.emit('hello', { h: 1 });
    socket.on('serverAsk', (data, respond) => respond(null, { a: 2 }));
    assert.deepEqual(await emit14(socket, 'ask', { event: 'serverAsk', data: { q: 1 } }), { a: 2 });
    const pushed = event14(socket, 'serverPush');
    await emit14(socket, 'tell', { event: 'serverPush', data: { x: 1 } });
    assert.deepEqual((await pushed)[0], { x: 1 });
    const messages = [];
    let arrived = () => {};
    news.watch((data) => { messages.push(data); arrived(); });
    // A waiter takes one message and unhooks itself, so a later message stays queued for the
    // next call instead of going to a waiter that was already served.
    const next = () => (messages.length
      ? Promise.resolve(messages.shift())
      : wait(new Promise((r) => { arrived = () => { arrived = () => {}; r(messages.shift()); }; }), 'v14 #publish'));
    await emit14(socket, 'announce', { channel: 'news-84-v14', data: { headline: 'hi' } });
    assert.deepEqual(await next(), { headline: 'hi' });
    const privateChannel = socket.subscribe('private/bob14', { waitForAuth: true });
    await emit14(socket, 'login', { username: 'bob14' });
    if (privateChannel.state !== 'subscribed') await event14(privateChannel, 'subscribe');
    await new Promise((resolve, reject) => socket.publish('news-84-v14', { from: 'client14' }, (err) => (err ? reject(err) : resolve())));
    assert.deepEqual(await next(), { from: 'client14' });
    socket.unsubscribe('private/bob14');
    const kicked = event14(socket, 'kickOut');
    await emit14(socket, 'kick', { channel: 'news-84-v14', message: 'bye' });
    assert.deepEqual(await kicked, ['bye', 'news-84-v14']);
    const token = socket.signedAuthToken;
    const deauthenticated = event14(socket, 'deauthenticate');
    await emit14(socket, 'logout');
    await deauthenticated;
    await new Promise((resolve, reject) => socket.authenticate(token, (err) => (err ? reject(err) : resolve())));
    assert.equal(socket.authState, 'authenticated');
    const closed = event14(socket, 'disconnect');
    socket.emit('bye', { code: 4567, reason: 'custom reason' }, () => {});
    assert.deepEqual(await closed, [4567, 'custom reason']);
  } finally {
    socket.disconnect();
  }
}

test('the v20 and v14 conversations run at the same time against one auto cluster', async () => {
  const cluster = await startCluster({ SC_WORKER__COMMAND: chatWorker });
  try {
    await Promise.all([conversation20(cluster), conversation14(cluster)]);
  } finally {
    await cluster.stop();
  }
});

test('allow_client_publish = false: InvalidActionError, server publishes still flow', async () => {
  const cluster = await startCluster({ SC_WORKER__COMMAND: chatWorker, SC_WORKER__ALLOW_CLIENT_PUBLISH: 'false' });
  const socket = v20(cluster, '127.0.0.1');
  try {
    const channel = socket.subscribe('closed');
    await wait(channel.listener('subscribe').once(), 'subscribe');
    await assert.rejects(socket.invokePublish('closed', 1), (err) => err.name === 'InvalidActionError' && /disabled/.test(err.message));
    const iterator = channel[Symbol.asyncIterator]();
    await socket.invoke('announce', { channel: 'closed', data: 2 });
    assert.equal((await wait(iterator.next(), 'server publish')).value, 2);
  } finally {
    socket.disconnect();
    await cluster.stop();
  }
});

test('origins: a browser origin on the list connects, others get 403', async () => {
  const cluster = await startCluster({ SC_WORKER__ORIGINS: 'app.example:443 localhost:*' });
  try {
    const good = sc20.create({ hostname: cluster.hostname, port: cluster.port, autoReconnect: false, wsOptions: { origin: 'https://app.example' } });
    await wait(good.listener('connect').once(), 'allowed origin connects');
    good.disconnect();
    const response = await new Promise((resolve, reject) => {
      const req = http.get({
        host: cluster.hostname,
        port: cluster.port,
        path: '/socketcluster/',
        headers: { Origin: 'https://evil.example', Connection: 'Upgrade', Upgrade: 'websocket', 'Sec-WebSocket-Version': '13', 'Sec-WebSocket-Key': 'dGhlIHNhbXBsZSBub25jZQ==' },
      }, (res) => {
        let body = '';
        res.on('data', (chunk) => { body += chunk; });
        res.on('end', () => resolve({ status: res.statusCode, body }));
      });
      req.on('upgrade', () => reject(new Error('upgraded despite the origin')));
      req.on('error', reject);
    });
    assert.equal(response.status, 403);
    assert.equal(response.body, 'Failed to authorize socket handshake - Invalid origin: https://evil.example');
    const bad = sc20.create({ hostname: cluster.hostname, port: cluster.port, autoReconnect: false, wsOptions: { origin: 'https://evil.example' } });
    const { error } = await wait(bad.listener('error').once(), 'refused origin errors');
    assert.ok(error);
    bad.disconnect();
  } finally {
    await cluster.stop();
  }
});

test('protocol_version pinned to 1 or 2 serves only its own client line', async () => {
  for (const [version, good, other] of [['1', v14, v20], ['2', v20, v14]]) {
    const cluster = await startCluster({ SC_WORKER__PROTOCOL_VERSION: version, SC_WORKER__PING_INTERVAL: '300ms', SC_WORKER__PING_TIMEOUT: '1s' });
    try {
      const right = good(cluster, '127.0.0.1');
      const wrong = other(cluster, '127.0.0.2');
      // The mismatched client never answers the other line's pings: closed with 4001.
      const closeCode = version === '1'
        ? wait(wrong.listener('close').once(), 'v20 on a v1 server closes', 5000).then((e) => e.code)
        : event14(wrong, 'close').then(([code]) => code);
      await new Promise((r) => setTimeout(r, 2500));
      assert.equal(right.state, 'open', `the v${version} client stays`);
      assert.ok([4001, 4000].includes(await closeCode), 'the other line times out');
      right.disconnect();
      wrong.disconnect();
    } finally {
      await cluster.stop();
    }
  }
});
