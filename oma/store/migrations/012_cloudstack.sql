-- The CloudStack side (oma/cloudstack): the settings the OMA reaches CloudStack with, and the
-- network mappings of the VMs it manages.

-- CloudStack (OSSEA) settings. The API key and the secret key are AES-GCM ciphertexts (the key
-- file in the data directory, as the vCenter passwords); no answer ever carries them. At most
-- one set is active: the one every CloudStack call of the OMA uses.
CREATE TABLE cloudstack_configs (
    id                    serial PRIMARY KEY,
    name                  text NOT NULL UNIQUE,
    api_url               text NOT NULL,      -- http(s)://host:port/client/api
    api_key_ciphertext    bytea NOT NULL,
    secret_key_ciphertext bytea NOT NULL,
    domain                text NOT NULL DEFAULT '',   -- the domain's name or path ('' = the key's own)
    zone_id               text NOT NULL DEFAULT '',
    template_id           text NOT NULL DEFAULT '',
    network_id            text NOT NULL DEFAULT '',
    service_offering_id   text NOT NULL DEFAULT '',
    disk_offering_id      text NOT NULL DEFAULT '',
    oma_vm_id             text NOT NULL DEFAULT '',
    is_active             boolean NOT NULL DEFAULT false,
    created_by            text NOT NULL,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    last_test_at          timestamptz,
    last_test_ok          boolean,
    last_test_message     text
);
CREATE UNIQUE INDEX cloudstack_configs_one_active ON cloudstack_configs ((true)) WHERE is_active;

-- Source network (as vSphere names it) -> CloudStack network, per managed VM; the network a
-- test failover uses is mapped apart (is_test_network), so a VM has at most one live and one
-- test mapping per source network.
CREATE TABLE network_mappings (
    id                       serial PRIMARY KEY,
    vm_context_id            text NOT NULL REFERENCES vm_contexts (context_id) ON DELETE CASCADE,
    source_network_name      text NOT NULL,
    destination_network_id   text NOT NULL,
    destination_network_name text NOT NULL DEFAULT '',
    is_test_network          boolean NOT NULL DEFAULT false,
    created_by               text NOT NULL,
    created_at               timestamptz NOT NULL DEFAULT now(),
    updated_at               timestamptz NOT NULL DEFAULT now(),
    UNIQUE (vm_context_id, source_network_name, is_test_network)
);
