// Starts the real sc-master (supervise mode) running the chat example's worker for a test, and
// stops it afterwards.
import http from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { masterEnv, startMaster } from '../master.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
export const root = path.resolve(here, '../..');
export const binDir = process.env.SC_TEST_BIN_DIR || path.join(root, 'target/debug');
export const chatWorker = path.join(binDir, 'sc-chat-worker');

// Runs sc-master with the given SC_* environment; resolves once it prints "cluster ready", with
// the cluster's address (`base`: its HTTP root, where the chat worker serves the page).
export function startCluster(env = {}, { readyTimeoutMs = 60000 } = {}) {
  return startMaster({
    binDir,
    env: masterEnv(env),
    readyTimeoutMs,
    parse: (url) => ({ hostname: url.hostname, port: Number(url.port), path: url.pathname, base: `http://${url.host}` }),
  });
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
