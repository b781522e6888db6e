// Starts the real sc-master (supervise mode, no admin token configured, so it makes one and
// prints the admin page link) for a test, and stops it afterwards.
import { spawn } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
export const root = path.resolve(here, '../..');
export const binDir = process.env.SC_TEST_BIN_DIR || path.join(root, 'target/debug');

// Runs sc-master with the given SC_* environment; resolves once it prints "cluster ready", with
// the WebSocket address, the admin page link it printed and the token in that link.
export function startCluster(env = {}, { readyTimeoutMs = 60000 } = {}) {
  const childEnv = {
    ...process.env,
    SC_BALANCER__LISTEN: '127.0.0.1:0',
    SC_MASTER__ADMIN_LISTEN: '127.0.0.1:0',
    RUST_LOG: process.env.RUST_LOG || 'warn',
    ...env,
  };
  delete childEnv.SC_MASTER__ADMIN_TOKEN;
  const child = spawn(path.join(binDir, 'sc-master'), [], { env: childEnv, stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  const ready = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no "cluster ready" within ${readyTimeoutMs} ms:\n${out}`)), readyTimeoutMs);
    child.stdout.on('data', (chunk) => {
      out += chunk;
      const m = out.match(/cluster ready: (wss?:\/\/\S+)/);
      if (!m) return;
      clearTimeout(timer);
      const page = out.match(/admin page: (http:\/\/\S+)/);
      if (!page) return reject(new Error(`sc-master printed no admin page link:\n${out}`));
      const url = new URL(m[1]);
      const link = new URL(page[1]);
      resolve({
        hostname: url.hostname,
        port: Number(url.port),
        path: url.pathname,
        pageLink: page[1],
        admin: link.origin,
        token: new URLSearchParams(link.hash.slice(1)).get('token'),
      });
    });
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`sc-master exited early (${code ?? signal}):\n${out}`));
    });
  });
  const stop = () => new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) return resolve();
    const killer = setTimeout(() => child.kill('SIGKILL'), 20000);
    child.once('exit', () => { clearTimeout(killer); resolve(); });
    child.kill('SIGTERM');
  });
  return ready.then((info) => ({ ...info, child, stop }), async (err) => { await stop(); throw err; });
}

// GET on the master's admin API with the cluster's token; resolves with the parsed body.
export async function status(cluster) {
  const response = await fetch(`${cluster.admin}/status`, { headers: { authorization: `Bearer ${cluster.token}` } });
  if (!response.ok) throw new Error(`/status answered ${response.status}`);
  return response.json();
}

// Resolves with the first value `fn` returns that is not undefined or false, polling until `ms`.
export async function eventually(fn, ms, what) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    last = await fn();
    if (last !== undefined && last !== false) return last;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}
