// A real MCP client for the end-to-end tests: the official TypeScript SDK's Client over its
// Streamable HTTP transport (package.json pins the version).
//
// Usage: node client.mjs URL
// Connects (initialize, then notifications/initialized), prints one JSON line
// {"session_id": ID}, then reads commands from standard input, one JSON object per line,
// and answers each with one JSON line on standard output:
//   {"tool": NAME, "arguments": {...}} -> {"ok": true, "text": FIRST_TEXT, "session_id": ID}
//                                      or {"ok": false, "error": MESSAGE, "session_id": ID}
//   {"close": true}                    -> DELETE of the session, {"ok": true}, exit 0
// End of input closes the same way. Errors that prevent connecting exit 1 with a message
// on standard error.
import { createInterface } from "node:readline";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const url = process.argv[2];
if (!url) {
  console.error("usage: node client.mjs URL");
  process.exit(2);
}

const transport = new StreamableHTTPClientTransport(new URL(url));
const client = new Client({ name: "mcp-affinity-ts-client", version: "1.0.0" });
try {
  await client.connect(transport);
} catch (e) {
  console.error(`connect ${url}: ${e?.message ?? e}`);
  process.exit(1);
}
const say = (o) => process.stdout.write(JSON.stringify(o) + "\n");
say({ session_id: transport.sessionId });

async function close() {
  try {
    await transport.terminateSession();
  } catch (e) {
    // A server that does not allow DELETE answers 405; nothing to do.
  }
  await client.close();
  say({ ok: true });
  process.exit(0);
}

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  let cmd;
  try {
    cmd = JSON.parse(line);
  } catch (e) {
    say({ ok: false, error: `bad command: ${e.message}` });
    continue;
  }
  if (cmd.close) await close();
  try {
    const result = await client.callTool({ name: cmd.tool, arguments: cmd.arguments ?? {} });
    const text = result.content?.find((c) => c.type === "text")?.text;
    if (result.isError) say({ ok: false, error: `tool error: ${text}`, session_id: transport.sessionId });
    else say({ ok: true, text, session_id: transport.sessionId });
  } catch (e) {
    say({ ok: false, error: String(e?.message ?? e), session_id: transport.sessionId });
  }
}
await close();
