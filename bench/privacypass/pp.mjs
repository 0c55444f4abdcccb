// An independent Privacy Pass client and test issuer for the relay's tests,
// built on @cloudflare/privacypass-ts (RFC 9577, RFC 9578): nothing here
// shares code with the relay.
//
//   node pp.mjs keygen DIR
//       A type 2 issuer key pair (RSA-PSS 2048, SHA-384, salt 48) and a
//       type 1 key pair (VOPRF P-384): DIR/blind-rsa.spki (the public key
//       as RFC 9578 section 6.5 encodes it: SPKI with id-RSASSA-PSS),
//       DIR/blind-rsa.pkcs8 (its private key), DIR/voprf.secret (hex
//       scalar), DIR/voprf.public (the compressed element).
//   node pp.mjs token DIR TYPE CHALLENGES [COUNT]
//       Reads the Proxy-Authenticate values in CHALLENGES (one per line),
//       takes the PrivateToken challenge of TYPE (1 or 2), checks that its
//       token-key is DIR's key of that type, runs the issuance protocol as
//       client and as issuer, and prints COUNT (default 1) credentials,
//       `PrivateToken token=...`, one per line.
//   node pp.mjs token-any-key DIR TYPE CHALLENGES
//       The same without the token-key check: a token from DIR's key for a
//       challenge that named another key.
//   node pp.mjs token-other-origin DIR TYPE CHALLENGES ORIGIN
//       A token from DIR's key for the challenge with its origin info
//       replaced by ORIGIN (a token another origin asked for).
//   node pp.mjs vector DIR ISSUER ORIGIN
//       A known-answer vector for the relay's unit tests: a challenge with
//       a fixed redemption context and a token for it.

import { readFileSync, writeFileSync, mkdirSync } from 'node:fs';
import { webcrypto } from 'node:crypto';
import {
    TOKEN_TYPES,
    TokenChallenge,
    WWWAuthenticateHeader,
    AuthorizationHeader,
    publicVerif,
    privateVerif,
} from '@cloudflare/privacypass-ts';

const { Client: RsaClient, Issuer: RsaIssuer, BlindRSAMode, getPublicKeyBytes } = publicVerif;
const subtle = webcrypto.subtle;
const hex = (b) => Buffer.from(b).toString('hex');
const b64url = (b) => Buffer.from(b).toString('base64url');

async function keygen(dir) {
    mkdirSync(dir, { recursive: true });
    const pair = await RsaIssuer.generateKey(BlindRSAMode.PSS, {
        modulusLength: 2048,
        publicExponent: Uint8Array.from([1, 0, 1]),
    });
    writeFileSync(`${dir}/blind-rsa.spki`, await getPublicKeyBytes(pair.publicKey));
    writeFileSync(`${dir}/blind-rsa.pkcs8`, new Uint8Array(await subtle.exportKey('pkcs8', pair.privateKey)));
    const v = await privateVerif.keyGen();
    writeFileSync(`${dir}/voprf.secret`, hex(v.privateKey) + '\n', { mode: 0o600 });
    writeFileSync(`${dir}/voprf.public`, v.publicKey);
}

async function rsaIssuer(dir, name) {
    const params = TOKEN_TYPES.BLIND_RSA.rsaParams;
    const priv = await subtle.importKey('pkcs8', readFileSync(`${dir}/blind-rsa.pkcs8`), params, true, ['sign']);
    // The public half from the SPKI, through rsaEncryption as WebCrypto wants.
    const spki = new Uint8Array(readFileSync(`${dir}/blind-rsa.spki`));
    const { util } = await import('@cloudflare/privacypass-ts');
    const pub = await subtle.importKey('spki', util.convertRSASSAPSSToEnc(spki), params, true, ['verify']);
    return { issuer: new RsaIssuer(BlindRSAMode.PSS, name, priv, pub), key: spki };
}

function voprfIssuer(dir, name) {
    const secret = Uint8Array.from(Buffer.from(readFileSync(`${dir}/voprf.secret`, 'utf8').trim(), 'hex'));
    const key = new Uint8Array(readFileSync(`${dir}/voprf.public`));
    return { issuer: new privateVerif.Issuer(name, secret, key), key };
}

// One token for `challenge` from DIR's key of `type`.
async function mint(dir, type, challenge) {
    if (type === 2) {
        const { issuer, key } = await rsaIssuer(dir, challenge.issuerName);
        const client = new RsaClient(BlindRSAMode.PSS);
        const request = await client.createTokenRequest(challenge, key);
        const token = await client.finalize(await issuer.issue(request));
        if (!(await issuer.verify(token))) throw new Error('the issuer does not verify its own token');
        return new AuthorizationHeader(token).toString();
    }
    const { issuer, key } = voprfIssuer(dir, challenge.issuerName);
    const client = new privateVerif.Client();
    const request = await client.createTokenRequest(challenge, key);
    const token = await client.finalize(await issuer.issue(request));
    return new AuthorizationHeader(token).toString();
}

async function token(dir, type, challenges, count, checkKey, origin) {
    const ours = type === 2 ? readFileSync(`${dir}/blind-rsa.spki`) : readFileSync(`${dir}/voprf.public`);
    const parsed = challenges
        .split('\n')
        .filter((l) => l.trim().length > 0)
        .flatMap((l) => WWWAuthenticateHeader.parse(l.trim()));
    const found = parsed.find((h) => h.challenge.tokenType === type);
    if (!found) throw new Error(`no PrivateToken challenge of type ${type} in ${JSON.stringify(challenges)}`);
    if (checkKey && Buffer.compare(Buffer.from(found.tokenKey), ours) !== 0) {
        throw new Error(`the challenge's token-key is not our type ${type} key`);
    }
    let challenge = found.challenge;
    if (origin !== undefined) {
        challenge = new TokenChallenge(challenge.tokenType, challenge.issuerName, challenge.redemptionContext, [origin]);
    }
    const out = [];
    for (let i = 0; i < count; i++) out.push(await mint(dir, type, challenge));
    process.stdout.write(out.join('\n') + '\n');
}

async function vector(dir, issuerName, origin) {
    const challenge = new TokenChallenge(TOKEN_TYPES.BLIND_RSA.value, issuerName, new Uint8Array(32).fill(7), [origin]);
    const header = await mint(dir, 2, challenge);
    const spki = readFileSync(`${dir}/blind-rsa.spki`);
    process.stdout.write(
        `pub const TOKEN_KEY: &str = "${b64url(spki)}";\n` +
            `pub const CHALLENGE: &str = "${b64url(challenge.serialize())}";\n` +
            `pub const CREDENTIALS: &str = "${header}";\n`,
    );
}

const [cmd, ...args] = process.argv.slice(2);
try {
    if (cmd === 'keygen') await keygen(args[0]);
    else if (cmd === 'token' || cmd === 'token-any-key')
        await token(args[0], Number(args[1]), args[2], Number(args[3] ?? 1), cmd === 'token');
    else if (cmd === 'token-other-origin') await token(args[0], Number(args[1]), args[2], 1, true, args[3]);
    else if (cmd === 'vector') await vector(args[0], args[1], args[2]);
    else throw new Error(`usage: pp.mjs keygen|token|token-any-key|vector ... (got ${cmd})`);
} catch (e) {
    process.stderr.write(`pp.mjs: ${e.stack ?? e}\n`);
    process.exit(1);
}
