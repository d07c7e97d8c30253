// Node's ws package as a client of the proxy: send a file in binary messages to an echo
// target, write what comes back to another file, then close. The Python test compares them.
// Usage: node ws_echo_client.js URL IN_FILE OUT_FILE MESSAGE_SIZES [CA_FILE]
// MESSAGE_SIZES: comma-separated byte counts, used in turn.
'use strict';
const fs = require('fs');
const WebSocket = require('ws');

const [url, inFile, outFile, messageSizes, caFile] = process.argv.slice(2);
const data = fs.readFileSync(inFile);
const sizes = messageSizes.split(',').map(Number);
const ws = new WebSocket(url, ['binary'], caFile ? { ca: fs.readFileSync(caFile) } : {});
const chunks = [];
let received = 0;

function fail(message) {
    console.error(message);
    process.exit(2);
}

ws.on('open', () => {
    if (ws.protocol !== 'binary') fail(`subprotocol ${JSON.stringify(ws.protocol)}, not binary`);
    for (let offset = 0, turn = 0; offset < data.length; turn++) {
        const size = sizes[turn % sizes.length];
        ws.send(data.subarray(offset, offset + size));
        offset += size;
    }
});
ws.on('message', (message, isBinary) => {
    if (!isBinary) fail('a text message from the proxy');
    chunks.push(message);
    received += message.length;
    if (received >= data.length) {
        fs.writeFileSync(outFile, Buffer.concat(chunks));
        ws.close(1000, 'done');
    }
});
ws.on('close', (code, reason) => {
    console.log(JSON.stringify({ code, reason: reason.toString(), received }));
    process.exit(received === data.length ? 0 : 1);
});
ws.on('error', (error) => fail(`ws error: ${error.message}`));
