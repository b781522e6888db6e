// The chat example's page in headless Chromium (Debian's chromium, driven by playwright-core)
// against a real cluster of two sc-chat-worker workers: the page loads the stock
// socketcluster-client v20 browser build that the worker serves from examples/chat/node_modules
// (`npm ci` there first); alice and bob (two browser contexts) log in and join a room, each sees
// the other's message and both are in the members list; dave, a stock Node client on the other
// worker, shows up in it and leaves it, and his message reaches both pages; carol, who joins
// later, gets the room's history. No console error on any page. Screenshots go to
// target/chat-page/.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';
import socketClusterClient from 'socketcluster-client';
import { startCluster, chatWorker, workerFor, eventually, root } from './cluster.js';

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const SHOTS = path.join(process.env.CARGO_TARGET_DIR || path.join(root, 'target'), 'chat-page');
const CLIENT = path.join(root, 'examples/chat/node_modules/socketcluster-client/socketcluster-client.min.js');
const ROOM = 'garden';
const T = 15000;

let cluster;
let browser;
const sockets = [];
const problems = [];

after(async () => {
  for (const s of sockets) s.disconnect();
  await browser?.close();
  await cluster?.stop();
});

// A page of its own browser context (its own localStorage, so its own token).
async function open(name) {
  const context = await browser.newContext({ viewport: { width: 900, height: 640 } });
  const page = await context.newPage();
  page.on('console', (msg) => { if (msg.type() === 'error') problems.push(`${name}: console: ${msg.text()}`); });
  page.on('pageerror', (err) => problems.push(`${name}: page error: ${err.message}`));
  page.on('requestfailed', (req) => problems.push(`${name}: request failed: ${req.url()}`));
  await page.goto(`${cluster.base}/`);
  await page.waitForSelector('#status[data-state="connected"]', { timeout: T });
  return page;
}

async function join(page, name) {
  await page.fill('#name', name);
  await page.fill('#room', ROOM);
  await page.click('#join button');
  await page.waitForFunction((room) => [...document.querySelectorAll('#log p.sys')]
    .some((p) => p.textContent === `you joined ${room}`), ROOM, { timeout: T });
}

async function say(page, text) {
  await page.fill('#text', text);
  await page.click('#say button');
  await page.waitForFunction(() => document.getElementById('text').value === '', null, { timeout: T });
}

const members = (page) => page.$$eval('#members li', (lis) => lis.map((li) => li.dataset.user).sort());
const messages = (page) => page.$$eval('#log p.msg', (ps) => ps.map((p) => p.textContent));

async function membersAre(page, expected, what) {
  return eventually(async () => {
    const shown = await members(page);
    return JSON.stringify(shown) === JSON.stringify(expected) || undefined;
  }, T, `${what}: members ${JSON.stringify(expected)} (shown: ${JSON.stringify(await members(page))})`);
}

async function sees(page, line, what) {
  return eventually(async () => (await messages(page)).includes(line) || undefined, T, `${what} to see "${line}"`);
}

test('two users chat on the page, see each other in the room, and a later one gets the history', async () => {
  assert.ok(fs.existsSync(CHROMIUM), `${CHROMIUM} is missing (apt-get install chromium)`);
  assert.ok(fs.existsSync(CLIENT), `${CLIENT} is missing (npm ci in examples/chat)`);
  fs.mkdirSync(SHOTS, { recursive: true });
  const started = Date.now();
  cluster = await startCluster({ SC_CLUSTER__WORKERS: '2', SC_WORKER__COMMAND: chatWorker });

  // The worker serves the npm package's browser build as is.
  const served = await fetch(`${cluster.base}/socketcluster-client.min.js`);
  assert.equal(served.status, 200);
  assert.match(served.headers.get('content-type'), /^text\/javascript/);
  assert.equal(await served.text(), fs.readFileSync(CLIENT, 'utf8'));

  browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ['--no-sandbox'] });
  const alice = await open('alice');
  const bob = await open('bob');
  await join(alice, 'alice');
  await join(bob, 'bob');
  await membersAre(alice, ['alice', 'bob'], 'alice');
  await membersAre(bob, ['alice', 'bob'], 'bob');

  await say(alice, 'hello bob');
  await sees(bob, 'alice: hello bob', 'bob');
  await say(bob, 'hi alice');
  await sees(alice, 'bob: hi alice', 'alice');
  assert.deepEqual(await messages(alice), ['alice: hello bob', 'bob: hi alice']);
  assert.deepEqual(await messages(bob), ['alice: hello bob', 'bob: hi alice']);
  await alice.screenshot({ path: path.join(SHOTS, 'alice.png') });

  // dave: a stock Node client on the worker the pages are not on (the balancer hashes by
  // client address; the pages come from 127.0.0.1).
  const pagesWorker = await workerFor(cluster, '127.0.0.1');
  let localAddress;
  for (let i = 2; i < 64 && !localAddress; i++) {
    if ((await workerFor(cluster, `127.0.0.${i}`)) !== pagesWorker) localAddress = `127.0.0.${i}`;
  }
  assert.ok(localAddress, `no loopback address reaches the worker other than ${pagesWorker}`);
  const dave = socketClusterClient.create({
    hostname: cluster.hostname, port: cluster.port, path: cluster.path, autoReconnect: false, wsOptions: { localAddress },
  });
  sockets.push(dave);
  await dave.invoke('login', { username: 'dave' });
  const lobby = dave.subscribe(`chat/${ROOM}`);
  await lobby.listener('subscribe').once();
  await membersAre(alice, ['alice', 'bob', 'dave'], 'alice, with dave on the other worker');
  await membersAre(bob, ['alice', 'bob', 'dave'], 'bob, with dave on the other worker');
  const who = await dave.invoke('who', { room: ROOM });
  assert.equal(who.count, 3);
  assert.deepEqual(who.members.map((m) => m.user).sort(), ['alice', 'bob', 'dave']);
  await dave.invokePublish(`chat/${ROOM}`, 'hi from the other worker');
  await sees(alice, 'dave: hi from the other worker', 'alice');
  await sees(bob, 'dave: hi from the other worker', 'bob');
  await bob.screenshot({ path: path.join(SHOTS, 'bob-with-dave.png') });
  dave.disconnect();
  await membersAre(alice, ['alice', 'bob'], 'alice, after dave left');

  // carol joins later: the history, then the room as it is now.
  const carol = await open('carol');
  await join(carol, 'carol');
  assert.deepEqual(await messages(carol), ['alice: hello bob', 'bob: hi alice', 'dave: hi from the other worker']);
  await membersAre(carol, ['alice', 'bob', 'carol'], 'carol');
  await membersAre(alice, ['alice', 'bob', 'carol'], 'alice, after carol joined');
  await carol.screenshot({ path: path.join(SHOTS, 'carol-history.png') });

  // The app's HTTP route reads the same exchange data.
  const rooms = await (await fetch(`${cluster.base}/api/rooms`)).json();
  assert.deepEqual(rooms.rooms.find((r) => r.room === ROOM), { room: ROOM, members: 3, messages: 3 });

  assert.deepEqual(problems, [], 'no console error, page error or failed request');
  console.log(`chat page: three pages, two workers, ${Date.now() - started} ms`);
});
