// socketcluster-server 20 behind Node's https server: the wss peer of bench/run.sh, configured
// like the shared kit's servers/sc20.js (protocol 2, same ping and batch settings) but on TLS.
// Usage: node sc20-https.js PORT CERT.pem KEY.pem
// /stats (memory; ?gc=1 collects first, with --expose-gc) is also served over plain http on
// PORT+1, for sc-bench's --gc-url, which speaks http only.
// run.sh copies this file into the peers' servers/ directory, beside common.js and node_modules.
const fs = require('fs');
const http = require('http');
const https = require('https');
const scs = require('socketcluster-server');
const { statsHandler, ready } = require('./common');
const [port, cert, key] = [Number(process.argv[2]), process.argv[3], process.argv[4]];
if (!port || !cert || !key) { console.error('usage: node sc20-https.js PORT CERT.pem KEY.pem'); process.exit(64); }
const httpsServer = https.createServer({ cert: fs.readFileSync(cert), key: fs.readFileSync(key) }, (req, res) => {
  if (!statsHandler(req, res)) res.end('ok\n');
});
const agServer = scs.attach(httpsServer, {
  protocolVersion: 2,
  pingInterval: Number(process.env.SC_PING_INTERVAL || 8000),
  pingTimeout: Number(process.env.SC_PING_TIMEOUT || 30000),
  socketChannelLimit: 100000,
  batchInterval: 50,
});
(async () => { for await (const { error } of agServer.listener('error')) console.error('server error', error && error.message); })();
(async () => {
  for await (const { socket } of agServer.listener('connection')) {
    (async () => { for await (const req of socket.procedure('echo')) req.end(req.data); })();
  }
})();
http.createServer((req, res) => { if (!statsHandler(req, res)) res.end('ok\n'); }).listen(port + 1, '127.0.0.1');
httpsServer.listen(port, '127.0.0.1', () => ready(`socketcluster-server@${require('socketcluster-server/package.json').version} over https`, port));
