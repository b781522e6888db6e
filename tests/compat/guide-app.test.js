// The guide app (examples/guide-app, docs/app-guide.md) as the cluster's worker, driven by the
// stock client v20 with the same script that drives its socketcluster-server 20 twin
// (examples/guide-app/drive.mjs): login, the room's middleware, chat with history in the
// exchange, and the history over HTTP.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import client from 'sc-client-20';
import { binDir, startCluster } from './cluster.js';
import { drive } from '../../examples/guide-app/drive.mjs';

test('the guide app on sc-rs answers as its socketcluster-server 20 twin does', async () => {
  const cluster = await startCluster({
    SC_WORKER__COMMAND: path.join(binDir, 'sc-guide-app'),
    SC_APP__HISTORY: '3',
    SC_WORKER__PRESENCE_CHANNELS: 'chat/lobby', // as examples/guide-app/sc.toml
  });
  try {
    const out = await drive(client, cluster.hostname, cluster.port);
    assert.equal(out.error, undefined, out.error);
    assert.equal(out.anonymousSubscribe, 'LoginRequired');
    assert.equal(out.emptyLogin, 'LoginError');
    const message = { from: 'alice', text: 'hi bob' };
    assert.deepEqual(out.heard, message);
    assert.deepEqual(out.history, [message]);
    assert.deepEqual(out.httpHistory, [message]);
    assert.equal(out.who.channel, 'chat/lobby');
    assert.deepEqual(out.who.members.map((m) => m.user), ['bob'], JSON.stringify(out.who));
  } finally {
    await cluster.stop();
  }
});
