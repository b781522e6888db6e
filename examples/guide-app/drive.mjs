// Drives the guide app (either version) with the stock client v20 and returns what each call
// gave: tests/compat/guide-app.test.js runs it against sc-rs, and `node drive.mjs [port]` here
// (with socketcluster-client installed beside it) against `node server.js`.
export async function drive(socketClusterClient, hostname, port) {
  const within = (what, promise) => Promise.race([
    promise,
    new Promise((_, reject) => setTimeout(() => reject(new Error(`${what}: nothing within 10 s`)), 10000)),
  ]);
  const connect = () => socketClusterClient.create({ hostname, port, autoReconnect: false });
  const [alice, bob] = [connect(), connect()];
  const out = {};
  try {
    out.anonymousSubscribe = await within('anonymous subscribe', alice.subscribe('chat/lobby').listener('subscribeFail').once())
      .then(({ error }) => error.name);
    alice.unsubscribe('chat/lobby');
    out.emptyLogin = await alice.invoke('login', { username: '' }).then(() => 'accepted', (e) => e.name);
    await within('login', alice.invoke('login', { username: 'alice' }));
    await within('login', bob.invoke('login', { username: 'bob' }));
    const room = bob.subscribe('chat/lobby');
    await within('subscribe', room.listener('subscribe').once());
    const heard = (async () => { for await (const message of room) return message; })();
    await within('say', alice.invoke('say', { text: 'hi bob' }));
    out.heard = await within('publish', heard);
    out.history = await within('history', bob.invoke('history'));
    out.who = await within('who', alice.invoke('who'));
    out.httpHistory = await (await fetch(`http://${hostname}:${port}/api/history`)).json();
  } catch (error) {
    out.error = String(error && error.stack || error);
  }
  alice.disconnect();
  bob.disconnect();
  return out;
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const { default: client } = await import('socketcluster-client');
  console.log(JSON.stringify(await drive(client, '127.0.0.1', Number(process.argv[2] || 8000)), null, 1));
  process.exit(0);
}
