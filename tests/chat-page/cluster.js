// Starts the real sc-master (supervise mode) running the chat example's worker for a test, and
// stops it afterwards.
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { masterEnv, startMaster } from '../master.mjs';

export { eventually, workerFor } from '../master.mjs';

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
