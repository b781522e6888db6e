// Starts the real sc-master (supervise mode) for a test and stops it afterwards.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { eventually as pollUntil, masterEnv, startMaster } from '../master.mjs';

export { workerFor } from '../master.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
export const binDir = process.env.SC_TEST_BIN_DIR || path.resolve(here, '../../target/debug');

// The admin API token of the masters started here (sent by `admin`).
const ADMIN_TOKEN = 'sc-compat-admin-token';

// Runs sc-master with the given SC_* environment; resolves once it prints "cluster ready".
export function startCluster(env = {}, { readyTimeoutMs = 30000 } = {}) {
  return startMaster({
    binDir,
    env: masterEnv({ SC_MASTER__ADMIN_TOKEN: ADMIN_TOKEN, ...env }),
    readyTimeoutMs,
    killAfterMs: 15000,
    parse: (url, out) => ({
      url: url.href,
      hostname: url.hostname,
      port: Number(url.port),
      path: url.pathname,
      admin: out.match(/admin api: (http:\/\/\S+)/)?.[1],
    }),
  });
}

// The chat example app (examples/chat) as the worker command.
export const chatWorker = path.join(binDir, 'sc-chat-worker');

// The sc-* daemons started by the master `pid`: [{pid, program, id}].
export function daemonsOf(pid) {
  const found = [];
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = fs.readFileSync(`/proc/${entry}/stat`, 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      if (Number(fields[1]) !== pid || fields[0] === 'Z') continue;
      const args = fs.readFileSync(`/proc/${entry}/cmdline`, 'utf8').split('\0');
      const program = path.basename(args[0]);
      const i = args.indexOf('--id');
      found.push({ pid: Number(entry), program, id: i >= 0 ? args[i + 1] : '' });
    } catch { /* the process ended meanwhile */ }
  }
  return found;
}

// GET or POST on the master's admin API; resolves with the parsed JSON body and the status.
export async function admin(cluster, path, method = 'GET') {
  const headers = { authorization: `Bearer ${ADMIN_TOKEN}`, 'content-type': 'application/json' };
  const response = await fetch(cluster.admin + path, { method, headers });
  return { status: response.status, body: await response.json() };
}

// Resolves with the first value `fn` returns that is not undefined, polling until `ms`.
// `eventually` of tests/master.mjs, polling every 50 ms.
export const eventually = (fn, ms = 5000, what = 'condition') => pollUntil(fn, ms, what, 50);

export function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(`timed out: ${what}`)), ms); }),
  ]);
}
