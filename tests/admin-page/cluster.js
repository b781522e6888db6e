// Starts the real sc-master (supervise mode, no admin token configured, so it makes one and
// prints the admin page link) for a test, and stops it afterwards.
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { eventually as pollUntil, masterEnv, startMaster } from '../master.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
export const root = path.resolve(here, '../..');
export const binDir = process.env.SC_TEST_BIN_DIR || path.join(root, 'target/debug');

// Runs sc-master with the given SC_* environment; resolves once it prints "cluster ready", with
// the WebSocket address, the admin page link it printed and the token in that link.
export function startCluster(env = {}, { readyTimeoutMs = 60000 } = {}) {
  const childEnv = masterEnv(env);
  delete childEnv.SC_MASTER__ADMIN_TOKEN;
  return startMaster({
    binDir,
    env: childEnv,
    readyTimeoutMs,
    parse: (url, out) => {
      const page = out.match(/admin page: (http:\/\/\S+)/);
      if (!page) throw new Error(`sc-master printed no admin page link:\n${out}`);
      const link = new URL(page[1]);
      return {
        hostname: url.hostname,
        port: Number(url.port),
        path: url.pathname,
        pageLink: page[1],
        admin: link.origin,
        token: new URLSearchParams(link.hash.slice(1)).get('token'),
      };
    },
  });
}

// GET on the master's admin API with the cluster's token; resolves with the parsed body.
export async function status(cluster) {
  const response = await fetch(`${cluster.admin}/status`, { headers: { authorization: `Bearer ${cluster.token}` } });
  if (!response.ok) throw new Error(`/status answered ${response.status}`);
  return response.json();
}

// `eventually` of tests/master.mjs, polling every 200 ms.
export const eventually = (fn, ms, what) => pollUntil(fn, ms, what, 200);
