// The sc-master of a Node test (tests/compat, tests/admin-page, tests/chat-page): started in
// supervise mode with SC_* environment, ready once it prints "cluster ready", stopped with
// SIGTERM (SIGKILL after a grace period). Each suite reads what it needs from the output. Also
// the helpers the suites share: which worker a client address lands on, and polling.
import { spawn } from 'node:child_process';
import http from 'node:http';
import path from 'node:path';

// The environment of a test's master: this process's, loopback listeners on free ports, quiet
// logs, then `env`.
export function masterEnv(env = {}) {
  return {
    ...process.env,
    SC_BALANCER__LISTEN: '127.0.0.1:0',
    SC_MASTER__ADMIN_LISTEN: '127.0.0.1:0',
    RUST_LOG: process.env.RUST_LOG || 'warn',
    ...env,
  };
}

// Runs `binDir`/sc-master with `env`; resolves once it prints "cluster ready" with what
// `parse(url, output)` makes of the cluster's WebSocket URL and the output so far (it may throw),
// plus `child` and `stop()`.
export function startMaster({ binDir, env, readyTimeoutMs, killAfterMs = 20000, parse }) {
  const child = spawn(path.join(binDir, 'sc-master'), [], { env, stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  const ready = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no "cluster ready" within ${readyTimeoutMs} ms:\n${out}`)), readyTimeoutMs);
    child.stdout.on('data', (chunk) => {
      out += chunk;
      const m = out.match(/cluster ready: (wss?:\/\/\S+)/);
      if (!m) return;
      clearTimeout(timer);
      try {
        resolve(parse(new URL(m[1]), out));
      } catch (err) {
        reject(err);
      }
    });
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`sc-master exited early (${code ?? signal}):\n${out}`));
    });
  });
  const stop = () => new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) return resolve();
    const killer = setTimeout(() => child.kill('SIGKILL'), killAfterMs);
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

// Resolves with the first value `fn` returns that is not undefined or false, polling every
// `every` ms until `ms` have passed.
export async function eventually(fn, ms = 5000, what = 'condition', every = 100) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await fn();
    if (value !== undefined && value !== false) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, every));
  }
}
