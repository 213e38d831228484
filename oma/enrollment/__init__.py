"""VMA enrollment: how a new VMA gets its own login on the OMA.

1. an administrator creates a pairing code (:mod:`oma.enrollment.codes`): 12 characters from an
   unambiguous alphabet, shown once, stored as a sha256 digest, single-use, expiring
   (10 minutes by default);
2. the VMA enrolls with the code, its name, version, fingerprint and its ed25519 SSH public key;
   the code is consumed atomically and the VMA receives a random challenge;
3. the VMA proves it holds the private key (ed25519 signature of the challenge, base64:
   :mod:`oma.enrollment.keys`); the enrollment now awaits approval;
4. an administrator approves (or rejects) it; approval issues an appliance id (``vma-…``) and a
   random secret: the secret is stored argon2-hashed for login, and encrypted until the VMA fetches
   it once (which again requires the challenge signature);
5. the VMA logs in with ``POST /auth/login`` (``username`` = appliance id, ``password`` = secret,
   :mod:`oma.access.login`). Revoking it revokes its tokens in the same transaction, and token
   checks also require an approved enrollment, so the next request already gets 401.

Steps 2 to 5 are :mod:`oma.enrollment.enrollments`; every step is written to ``vma_audit_log``
(:mod:`oma.enrollment.audit`). The HTTP side is :mod:`oma.api.enrollment`.
"""
