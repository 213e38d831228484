-- Replica volumes as CloudStack data volumes (oma/replication/volumes.py, oma/cloudstack/volumes.py).
-- A volume row says where its generation lives: a file in the volumes directory ('file', the
-- embedded default) or a CloudStack volume attached to the OMA VM ('cloudstack'). A CloudStack
-- generation is recorded with the name it is created with BEFORE createVolume is sent, so that a
-- restart finds (by name) and deletes a volume whose UUID never came back; its UUID once
-- createVolume answered; its device on the OMA VM once attached (also in path).
ALTER TABLE replica_volumes
    ADD COLUMN backend                text NOT NULL DEFAULT 'file' CHECK (backend IN ('file', 'cloudstack')),
    ADD COLUMN cloudstack_volume_name text,
    ADD COLUMN cloudstack_volume_id   text,
    ADD COLUMN device_path            text;

-- What each job's disk wrote into, as the API shows it.
ALTER TABLE replication_job_disks
    ADD COLUMN cloudstack_volume_id text;
