// A real MCP 2026-07-28 listener for the end-to-end tests: the official TypeScript SDK v2
// Client (npm @modelcontextprotocol/client, version pinned in package.json) in
// version-negotiation "auto" mode (server/discover, then 2026-07-28), holding one
// subscriptions/listen stream and listening again whenever it ends — as an application must:
// the SDK's listen() has "no automatic re-listen — call listen() again to re-establish".
//
// Usage: node listen2026.mjs URL
// Prints one JSON line per event on standard output:
//   {"event": "acknowledged"}                 a listen stream is established
//   {"event": "closed", "cause": CAUSE}       it ended (CAUSE "remote": the server or a proxy
//                                             ended it; the script then listens again)
//   {"event": "error", "error": MESSAGE}      a listen attempt failed (retried after 100 ms)
// End of standard input closes the client and exits 0. Errors that prevent connecting exit
// 1 with a message on standard error.
import { Client, StreamableHTTPClientTransport } from "@modelcontextprotocol/client";

const url = process.argv[2];
if (!url) {
  console.error("usage: node listen2026.mjs URL");
  process.exit(2);
}
const say = (o) => process.stdout.write(JSON.stringify(o) + "\n");
const client = new Client({ name: "mcp-affinity-ts-listener", version: "1.0.0" }, { versionNegotiation: { mode: "auto" } });
try {
  await client.connect(new StreamableHTTPClientTransport(new URL(url)));
} catch (e) {
  console.error(`connect ${url}: ${e?.message ?? e}`);
  process.exit(1);
}
if (client.getProtocolEra() !== "modern") {
  console.error(`connect ${url}: negotiated a 2025-era connection, not 2026-07-28`);
  process.exit(1);
}

let stopping = false;
let current;
process.stdin.on("end", async () => {
  stopping = true;
  await current?.close().catch(() => {});
  await client.close().catch(() => {});
  process.exit(0);
});
process.stdin.resume();

while (!stopping) {
  try {
    current = await client.listen({ toolsListChanged: true });
    say({ event: "acknowledged" });
    const cause = await current.closed;
    if (!stopping) say({ event: "closed", cause });
  } catch (e) {
    if (stopping) break;
    say({ event: "error", error: String(e?.message ?? e) });
    await new Promise((r) => setTimeout(r, 100));
  }
}
