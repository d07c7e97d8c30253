// Read a --record file the way noVNC's playback does: run it as JavaScript, then turn each
// frame of VNC_frame_data back into bytes (one character per byte).
// Usage: node record_frames.js FILE
// Prints JSON: the number of frames and, base64, the bytes sent to and received from the
// client, each in order; exits non-zero, saying why, if the file is not a valid recording.
'use strict';
const fs = require('fs');
const vm = require('vm');

function fail(message) {
    console.error(message);
    process.exit(1);
}

const file = process.argv[2];
const context = {};
vm.runInNewContext(fs.readFileSync(file, 'utf8'), context, { filename: file, timeout: 10000 });
const frames = context.VNC_frame_data;
if (!Array.isArray(frames)) fail('no VNC_frame_data array');
if (frames[frames.length - 1] !== 'EOF') fail('the array does not end with EOF');
const toClient = [];
const fromClient = [];
let previous = 0;
frames.slice(0, -1).forEach((frame, index) => {
    const mark = frame[0];
    if (mark !== '{' && mark !== '}') fail(`frame ${index} starts with ${JSON.stringify(mark)}`);
    const end = frame.indexOf(mark, 1);
    const ms = Number(frame.slice(1, end));
    if (end < 2 || !Number.isInteger(ms)) fail(`frame ${index} has no time stamp`);
    if (ms < previous) fail(`frame ${index} goes back in time: ${ms} < ${previous}`);
    previous = ms;
    const bytes = Buffer.alloc(frame.length - end - 1);
    for (let i = 0; i < bytes.length; i++) {
        const code = frame.charCodeAt(end + 1 + i);
        if (code > 255) fail(`frame ${index} holds character ${code}, not a byte`);
        bytes[i] = code;
    }
    (mark === '{' ? toClient : fromClient).push(bytes);
});
console.log(JSON.stringify({
    frames: frames.length - 1,
    toClient: Buffer.concat(toClient).toString('base64'),
    fromClient: Buffer.concat(fromClient).toString('base64'),
}));
