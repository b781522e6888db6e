// The chat example app (examples/chat) is safe to copy: a private channel is its owner's only,
// and a chat message always shows the name of the authenticated user who sent it (issue 12,
// item 9). The stock v20 client against a whole cluster of two sc-chat-worker processes, which
// also keep each room's last messages (`[app] history`, 3 here) and who is in it (issue 15).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import socketClusterClient from 'sc-client-20';
import { startCluster, chatWorker, withTimeout, workerFor } from './cluster.js';

let cluster;
const clients = [];
const T = 5000;

before(async () => {
  cluster = await startCluster({ SC_CLUSTER__WORKERS: '2', SC_WORKER__COMMAND: chatWorker, SC_APP__HISTORY: '3' });
});

after(async () => {
  for (const c of clients) c.disconnect();
  await cluster?.stop();
});

// A v20 client from a given loopback source address (the balancer hashes by client IP, so
// different addresses may land on different workers).
function connect(localAddress) {
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

async function loggedIn(localAddress, username) {
  const socket = connect(localAddress);
  await socket.invoke('login', { username });
  return socket;
}

async function subscribed(socket, name) {
  const channel = socket.subscribe(name);
  await withTimeout(channel.listener('subscribe').once(), T, `subscribe ${name}`);
  return channel;
}

async function refused(socket, name) {
  const channel = socket.subscribe(name);
  const { error } = await withTimeout(channel.listener('subscribeFail').once(), T, `subscribeFail ${name}`);
  return error;
}

// Every message the channel receives, in order.
function collect(channel) {
  const seen = [];
  (async () => { for await (const message of channel) seen.push(message); })();
  return seen;
}

async function until(seen, n, what) {
  const deadline = Date.now() + T;
  while (seen.length < n) {
    if (Date.now() > deadline) throw new Error(`timed out: ${what} (got ${JSON.stringify(seen)})`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

test('private/<name> can be subscribed by <name> only', async () => {
  const alice = await loggedIn('127.0.0.40', 'alice');
  const mallory = await loggedIn('127.0.0.41', 'mallory');
  const anonymous = connect('127.0.0.42');
  const inbox = collect(await subscribed(alice, 'private/alice'));

  const stolen = await refused(mallory, 'private/alice');
  assert.equal(stolen.name, 'SubscribeBlocked');
  assert.match(stolen.message, /another user/);
  assert.equal((await refused(anonymous, 'private/alice')).name, 'SubscribeBlocked');
  assert.equal((await refused(alice, 'private')).name, 'SubscribeBlocked', '`private` belongs to nobody');
  assert.equal((await refused(alice, 'private/alice2')).name, 'SubscribeBlocked', 'a prefix is not a name');

  // The inbox takes posts from anyone logged in, stamped with their name.
  await mallory.invokePublish('private/alice', { from: 'bob', text: 'psst' });
  await until(inbox, 1, 'the inbox message');
  assert.deepEqual(inbox, [{ from: 'mallory', text: { from: 'bob', text: 'psst' } }]);
  assert.equal(mallory.isSubscribed('private/alice', true), false);
});

test('a chat message shows the authenticated sender, whoever wrote a `from`', async () => {
  const alice = await loggedIn('127.0.0.43', 'alice');
  const lobby = collect(await subscribed(alice, 'chat/lobby'));
  const anonymous = connect('127.0.0.44');

  // Anonymous sockets cannot post on chat channels, with `announce` or a publish.
  await assert.rejects(
    anonymous.invoke('announce', { channel: 'chat/lobby', data: { from: 'alice', text: 'I am alice' } }),
    (err) => err.name === 'LoginRequired',
  );
  await assert.rejects(anonymous.invokePublish('chat/lobby', 'hi'), (err) => err.name === 'LoginRequired');
  await assert.rejects(
    anonymous.invoke('announce', { channel: 'private/alice', data: 'hi' }),
    (err) => err.name === 'LoginRequired',
  );

  // A logged-in user's announce is stamped with their own name, like their publishes.
  const bob = await loggedIn('127.0.0.45', 'bob');
  await bob.invoke('announce', { channel: 'chat/lobby', data: { from: 'alice', text: 'I am alice' } });
  await bob.invokePublish('chat/lobby', 'hello');
  await until(lobby, 2, 'two lobby messages');
  assert.deepEqual(lobby, [
    { from: 'bob', text: { from: 'alice', text: 'I am alice' } },
    { from: 'bob', text: 'hello' },
  ]);

  // Channels that show no sender still carry what server code publishes, as sent.
  const news = collect(await subscribed(alice, 'news'));
  await anonymous.invoke('announce', { channel: 'news', data: { v: 1 } });
  await until(news, 1, 'the news message');
  assert.deepEqual(news, [{ v: 1 }]);
});

test('a room keeps its last `[app] history` messages and knows who is in it, across workers', async () => {
  // frank (who reads) on the other worker than erin and the anonymous socket (who join).
  const here = await workerFor(cluster, '127.0.0.46');
  let there;
  for (let i = 47; i < 90 && !there; i++) {
    if ((await workerFor(cluster, `127.0.0.${i}`)) !== here) there = `127.0.0.${i}`;
  }
  assert.ok(there, 'an address that reaches the other worker');
  const erin = await loggedIn('127.0.0.46', 'erin');
  const frank = await loggedIn(there, 'frank');
  const anonymous = connect('127.0.0.46');
  const notices = collect(await subscribed(frank, 'who/attic'));
  await subscribed(erin, 'chat/attic');
  await subscribed(anonymous, 'chat/attic');
  await until(notices, 2, 'two join notices');
  assert.deepEqual(notices.map((n) => [n.event, n.room, n.user]).sort(), [['join', 'attic', null], ['join', 'attic', 'erin']]);
  const who = await frank.invoke('who', { room: 'attic' });
  assert.equal(who.count, 2);
  assert.deepEqual(who.members.map((m) => m.id).sort(), [erin.id, anonymous.id].sort());

  for (const n of [1, 2, 3, 4]) await erin.invokePublish('chat/attic', `m${n}`);
  await frank.invoke('announce', { channel: 'chat/attic', data: 'm5' });
  assert.deepEqual(await anonymous.invoke('history', { room: 'attic' }), [
    { from: 'erin', text: 'm3' }, { from: 'erin', text: 'm4' }, { from: 'frank', text: 'm5' },
  ]);
  assert.deepEqual(await frank.invoke('history', { room: 'nowhere' }), []);

  // Only the server announces on who/…; a socket that closes leaves.
  await assert.rejects(frank.invokePublish('who/attic', { event: 'join' }), (err) => err.name === 'PublishBlocked');
  anonymous.disconnect();
  await until(notices, 3, 'the leave notice');
  assert.deepEqual(notices[2].event, 'leave');
  assert.deepEqual((await frank.invoke('who', { room: 'attic' })).members.map((m) => m.user), ['erin']);
});
