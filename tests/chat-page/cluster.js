// Starts the real sc-master (supervise mode) running the chat example's worker for a test, and
// stops it afterwards.
import { spawn } from 'node:child_process';
import http from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
export const root = path.resolve(here, '../..');
export const binDir = process.env.SC_TEST_BIN_DIR || path.join(root, 'target/debug');
export const chatWorker = path.join(binDir, 'sc-chat-worker');

// Runs sc-master with the given SC_* environment; resolves once it prints "cluster ready", with
// the cluster's address (`base`: its HTTP root, where the chat worker serves the page).
export function startCluster(env = {}, { readyTimeoutMs = 60000 } = {}) {
  const child = spawn(path.join(binDir, 'sc-master'), [], {
    env: {
      ...process.env,
      SC_BALANCER__LISTEN: '127.0.0.1:0',
      SC_MASTER__ADMIN_LISTEN: '127.0.0.1:0',
      RUST_LOG: process.env.RUST_LOG || 'warn',
      ...env,
    },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  let out = '';
  const ready = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no "cluster ready" within ${readyTimeoutMs} ms:\n${out}`)), readyTimeoutMs);
    child.stdout.on('data', (chunk) => {
      out += chunk;
      const m = out.match(/cluster ready: (wss?:\/\/\S+)/);
      if (!m) return;
      clearTimeout(timer);
      const url = new URL(m[1]);
      resolve({ hostname: url.hostname, port: Number(url.port), path: url.pathname, base: `http://${url.host}` });
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

// The worker id the balancer sends `localAddress` to (from the x-sc-worker header).
export function workerFor(cluster, localAddress) {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: cluster.hostname, port: cluster.port, path: '/healthz', localAddress, agent: false }, (res) => {
      res.resume();
      resolve(res.headers['x-sc-worker']);
    });
    req.on('error', reject);
    req.setTimeout(5000, () => req.destroy(new Error('timeout')));
  });
}

// Resolves with the first value `fn` returns that is not undefined or false, polling until `ms`.
export async function eventually(fn, ms, what) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    last = await fn();
    if (last !== undefined && last !== false) return last;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}
