-- How the VMA checks a vCenter's TLS certificate, per credential (docs/oma.md, "vCenter TLS"):
-- 'verify' (CA and name, the default), 'thumbprint' (the certificate's SHA-256 or SHA-1
-- fingerprint, AB:CD:... as VMware tools show it, is pinned) or 'insecure' (nothing is checked;
-- only when an operator says so). Existing credentials are verified from now on.
ALTER TABLE vmware_credentials ADD COLUMN tls_mode text NOT NULL DEFAULT 'verify'
    CHECK (tls_mode IN ('verify', 'thumbprint', 'insecure'));
ALTER TABLE vmware_credentials ADD COLUMN tls_thumbprint text NOT NULL DEFAULT '';
ALTER TABLE vmware_credentials ADD CONSTRAINT vmware_credentials_tls_thumbprint_check
    CHECK ((tls_mode = 'thumbprint') = (tls_thumbprint <> ''));
