// An independent C2SP signed-note verifier (Node.js built-ins only), written
// from the spec, for the interop test: does a checkpoint signed by an ISPF node
// verify outside this project's code?
//   node verify_checkpoint.mjs '<vkey>' < note.txt   -> prints origin and size, exit 0
import { createHash, createPublicKey, verify } from "node:crypto";
import { readFileSync } from "node:fs";

const vkey = process.argv[2];
const note = readFileSync(0, "utf8");
const first = vkey.indexOf("+"), second = vkey.indexOf("+", first + 1);
const name = vkey.slice(0, first), hexId = vkey.slice(first + 1, second);
const key = Buffer.from(vkey.slice(second + 1), "base64");
if (key.length !== 33 || key[0] !== 1) throw new Error("not an Ed25519 vkey");
const pub = key.subarray(1);
const id = createHash("sha256").update(Buffer.concat([Buffer.from(name + "\n"), Buffer.from([1]), pub])).digest().subarray(0, 4);
if (id.toString("hex") !== hexId) throw new Error("key id mismatch");
const split = note.lastIndexOf("\n\n");
const text = note.slice(0, split + 1);
const spki = Buffer.concat([Buffer.from("302a300506032b6570032100", "hex"), pub]);
const pk = createPublicKey({ key: spki, format: "der", type: "spki" });
let ok = false;
for (const line of note.slice(split + 2).split("\n").filter((l) => l)) {
  const [dash, who, b64] = line.split(" ");
  if (dash !== "\u2014") throw new Error("bad signature line");
  const blob = Buffer.from(b64, "base64");
  if (who !== name || !blob.subarray(0, 4).equals(id)) continue; // unknown keys are ignored
  if (!verify(null, Buffer.from(text), pk, blob.subarray(4))) throw new Error("bad signature");
  ok = true;
}
if (!ok) throw new Error("no signature by the key");
const [origin, size, root] = text.split("\n");
if (Buffer.from(root, "base64").length !== 32) throw new Error("bad root");
console.log(`${origin} ${size}`);
