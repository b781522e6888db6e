// Drives an app made by `sc-master new` with the stock client v20: tests/e2e/new_app.rs starts
// the app's cluster and runs `node new-app.mjs <host> <port>`, then checks the JSON this prints
// (what each call gave). Not a *.test.js: `npm test` does not run it on its own.
import socketClusterClient from 'sc-client-20';

const [hostname, port] = [process.argv[2], Number(process.argv[3])];
const base = `http://${hostname}:${port}`;
const within = (ms, what, promise) => Promise.race([
  promise,
  new Promise((_, reject) => setTimeout(() => reject(new Error(`${what}: nothing within ${ms} ms`)), ms)),
]);
const first = async (stream) => { for await (const item of stream) return item; };

const socket = socketClusterClient.create({ hostname, port, autoReconnect: false });
const out = {};
try {
  out.hello = await within(10000, 'hello', socket.invoke('hello', { name: 'Ada' }));

  const noted = first(socket.receiver('noted'));
  socket.transmit('note', { text: 'first' });
  out.noted = await within(10000, 'noted', noted);

  const channel = socket.subscribe('notifications');
  await within(10000, 'subscribe', channel.listener('subscribe').once());
  const notification = first(channel);
  const posted = await fetch(`${base}/api/notify`, {
    method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ text: 'to everyone' }),
  });
  out.notifyStatus = posted.status;
  out.notification = await within(10000, 'notification', notification);

  const page = await fetch(`${base}/`);
  out.page = { status: page.status, text: await page.text() };
  const client = await fetch(`${base}/node_modules/socketcluster-client/socketcluster-client.min.js`);
  out.clientScript = { status: client.status, bytes: (await client.arrayBuffer()).byteLength };
} catch (error) {
  out.error = String(error && error.stack || error);
}
socket.disconnect();
console.log(JSON.stringify(out));
process.exit(out.error ? 1 : 0);
