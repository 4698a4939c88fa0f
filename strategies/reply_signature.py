"""The aggregator's signature check, plugged into the strategy's `reply_verifier` hook.

The facts a site signed are rebuilt from what the aggregator itself holds (training id, round,
the nonce and a_k it sent that node) plus the reply's site name, count and ciphertext bytes,
so a reply signed for anything else fails (`fedhealth.core.crypto.signing`).
"""

from flwr.app import MessageType

from fedhealth.core.crypto import wire
from fedhealth.core.crypto.signing import ReplyFacts, ReplyVerifier, SignatureError, ciphertext_digest
from strategies.reply_check import CheckedReply, ReplyRejected
from strategies.reply_check import ReplyVerifier as ReplyHook


def signature_hook(verifier: ReplyVerifier) -> ReplyHook:
    """`verifier` as the strategy's hook: a bad signature, an unregistered site or a repeated
    ciphertext becomes a `ReplyRejected` naming why."""

    def check(reply: CheckedReply, training_id: str) -> None:
        crypto = reply.content.config_records[wire.CRYPTO]
        digest = ""
        if reply.kind == MessageType.TRAIN:
            try:
                digest = ciphertext_digest(wire.record_to_ciphertexts(
                    reply.content[wire.UPDATE]))  # type: ignore[arg-type]  # checked: an ArrayRecord
            except (KeyError, TypeError, ValueError) as exc:
                raise ReplyRejected(f"its ciphertexts cannot be read to check the signature "
                                    f"({exc})") from None
        facts = ReplyFacts(
            kind=reply.kind, training_id=training_id,
            server_round=0 if reply.kind == MessageType.QUERY else reply.server_round,
            nonce=reply.nonce, site=reply.site, ciphertext_digest=digest,
            num_examples=reply.num_examples,
            site_weight=float(reply.site_weight) if reply.kind == MessageType.TRAIN
            and reply.site_weight is not None else 0.0)
        try:
            verifier.verify(facts, crypto.get(wire.SIGNATURE))
        except SignatureError as exc:
            raise ReplyRejected(f"signature check: {exc}") from None

    return check
