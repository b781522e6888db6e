// Starts the real sc-master (supervise mode) for a test and stops it afterwards.
import { spawn } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
export const binDir = process.env.SC_TEST_BIN_DIR || path.resolve(here, '../../target/debug');

// Runs sc-master with the given SC_* environment; resolves once it prints "cluster ready".
export function startCluster(env = {}, { readyTimeoutMs = 30000 } = {}) {
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
      const m = out.match(/cluster ready: (ws:\/\/\S+)/);
      const admin = out.match(/admin api: (http:\/\/\S+)/);
      if (m) {
        clearTimeout(timer);
        const url = new URL(m[1]);
        resolve({ url: m[1], hostname: url.hostname, port: Number(url.port), path: url.pathname, admin: admin?.[1] });
      }
    });
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`sc-master exited early (${code ?? signal}):\n${out}`));
    });
  });
  const stop = () => new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) return resolve();
    const killer = setTimeout(() => child.kill('SIGKILL'), 15000);
    child.once('exit', () => { clearTimeout(killer); resolve(); });
    child.kill('SIGTERM');
  });
  return ready.then((info) => ({ ...info, child, stop }), async (err) => { await stop(); throw err; });
}

// GET or POST on the master's admin API; resolves with the parsed JSON body and the status.
export async function admin(cluster, path, method = 'GET') {
  const response = await fetch(cluster.admin + path, { method });
  return { status: response.status, body: await response.json() };
}

// Resolves with the first value `fn` returns that is not undefined, polling until `ms`.
export async function eventually(fn, ms = 5000, what = 'condition') {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await fn();
    if (value !== undefined && value !== false) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

export function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(`timed out: ${what}`)), ms); }),
  ]);
}
