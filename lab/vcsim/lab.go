package main

// The lab's extension of the govmomi simulator: real disk images behind the VMs' disks,
// change tracking from the per-disk journal (journal.go), frozen snapshot images, and
// QueryChangedDiskAreas (qcda.go).
//
// How it hooks into the simulator, and why this way:
//
//   - The simulator dispatches a SOAP call by reflection on the object registered under the
//     call's `_this` reference. The documented extension is to re-register a VM wrapped in a type
//     of one's own, but the simulator's snapshot code type-asserts Map.Get(vm).(*VirtualMachine)
//     and would panic on a wrapper. So the VM stays as it is, and a companion object of type
//     "LabChangeTracker" with the VM's reference value is registered next to it; the HTTP layer
//     (ServeHTTP below) re-addresses QueryChangedDiskAreas calls from the VM to its companion. The
//     simulator still does everything else: session check, decoding, locking, fault and response
//     encoding.
//   - A Registry handler (PutObject/RemoveObject) sees every snapshot the simulator creates and
//     removes: on creation it freezes each disk's image and records the change ID in the snapshot's
//     own copy of the disk backing; on removal it deletes the frozen files.
//   - Before and after every SOAP request the VMs' change-tracking settings are reconciled with the
//     journals (a "reset" record when CBT is switched on, "off" when switched off) and each disk
//     backing's changeId is brought up to date with the guest's writes.

import (
	"bytes"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
	"github.com/vmware/govmomi/vim25/xml"
)

const trackerType = "LabChangeTracker"

type Lab struct {
	Self types.ManagedObjectReference // as a Registry handler

	datastores map[string]string // datastore name -> local directory
	window     int64             // bytes covered by one QueryChangedDiskAreas answer; 0 = a third
	block      int64             // change-tracking granularity in bytes
	journals   *journals
	inner      http.Handler

	mu        sync.Mutex
	snapFiles map[types.ManagedObjectReference][]string         // frozen files per snapshot
	snapJour  map[types.ManagedObjectReference]map[int32]string // journal per snapshot and disk key
}

func (l *Lab) Reference() types.ManagedObjectReference { return l.Self }

// resolve maps "[ds] dir/file" to the local file under the datastore's directory.
func (l *Lab) resolve(dsPath string) (string, error) {
	var p object.DatastorePath
	if !p.FromString(dsPath) {
		return "", fmt.Errorf("not a datastore path: %q", dsPath)
	}
	dir, ok := l.datastores[p.Datastore]
	if !ok {
		return "", fmt.Errorf("unknown datastore %q in %q", p.Datastore, dsPath)
	}
	clean := filepath.Clean("/" + p.Path)
	return filepath.Join(dir, clean), nil
}

// diskFiles gives, for a disk's descriptor "[ds] d/x.vmdk", the raw extent and the journal.
func diskFiles(descriptor string) (flat, journal string) {
	base := strings.TrimSuffix(descriptor, ".vmdk")
	return base + "-flat.vmdk", base + "-ctk.jsonl"
}

func flatBacking(d *types.VirtualDisk) *types.VirtualDiskFlatVer2BackingInfo {
	b, _ := d.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
	return b
}

func diskCapacity(d *types.VirtualDisk) int64 {
	if d.CapacityInBytes > 0 {
		return d.CapacityInBytes
	}
	return d.CapacityInKB * 1024
}

// ctkKey is the extraConfig key VMware uses to switch tracking per disk, e.g. "scsi0:1.ctkEnabled".
func ctkKey(devices object.VirtualDeviceList, d *types.VirtualDisk) string {
	if d.UnitNumber == nil {
		return ""
	}
	var prefix string
	var bus int32
	switch c := devices.FindByKey(d.ControllerKey).(type) {
	case types.BaseVirtualSCSIController:
		prefix, bus = "scsi", c.GetVirtualSCSIController().BusNumber
	case *types.VirtualAHCIController:
		prefix, bus = "sata", c.BusNumber
	case *types.VirtualNVMEController:
		prefix, bus = "nvme", c.BusNumber
	case *types.VirtualIDEController:
		prefix, bus = "ide", c.BusNumber
	default:
		return ""
	}
	return fmt.Sprintf("%s%d:%d.ctkEnabled", prefix, bus, *d.UnitNumber)
}

// trackingWanted says whether a disk of vm should be tracked: VM-wide changeTrackingEnabled,
// unless the disk's own "<bus>:<unit>.ctkEnabled" says FALSE.
func trackingWanted(cfg *types.VirtualMachineConfigInfo, d *types.VirtualDisk) bool {
	if cfg.ChangeTrackingEnabled == nil || !*cfg.ChangeTrackingEnabled {
		return false
	}
	key := ctkKey(cfg.Hardware.Device, d)
	for _, o := range cfg.ExtraConfig {
		ov := o.GetOptionValue()
		if key != "" && ov.Key == key {
			if s, ok := ov.Value.(string); ok && strings.EqualFold(s, "false") {
				return false
			}
		}
	}
	return true
}

// syncVM reconciles each disk's journal with the VM's tracking settings and refreshes the disk
// backings' changeId. The caller holds the VM's lock.
func (l *Lab) syncVM(vm *simulator.VirtualMachine) {
	if vm.Config == nil {
		return
	}
	for _, dev := range vm.Config.Hardware.Device {
		d, ok := dev.(*types.VirtualDisk)
		if !ok {
			continue
		}
		b := flatBacking(d)
		if b == nil {
			continue
		}
		lj, err := l.openJournal(b.FileName)
		if err != nil {
			continue // not a lab disk (no image on a lab datastore)
		}
		// A running VM starts tracking only at its next stun (snapshot, power cycle), as on ESXi.
		stun := vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOn
		if err := l.reconcile(lj, vm.Config, d, stun); err != nil {
			log.Printf("lab: %s: %v", b.FileName, err)
		}
		b.ChangeId = lj.state.changeID()
		lj.close()
	}
}

// openJournal locks the journal of the disk whose descriptor is dsPath, if the disk's raw extent exists.
func (l *Lab) openJournal(dsPath string) (*lockedJournal, error) {
	desc, err := l.resolve(dsPath)
	if err != nil {
		return nil, err
	}
	flat, journal := diskFiles(desc)
	if _, err := os.Stat(flat); err != nil {
		return nil, err
	}
	return l.journals.open(journal)
}

// reconcile appends the record that brings the journal in line with the disk's CBT setting.
// Switching tracking on takes effect only when stun is true (the VM is stunned or not running).
func (l *Lab) reconcile(lj *lockedJournal, cfg *types.VirtualMachineConfigInfo, d *types.VirtualDisk, stun bool) error {
	want := trackingWanted(cfg, d)
	disk := filepath.Base(flatBacking(d).FileName)
	var rec *journalRecord
	switch {
	case want && lj.state.current == "" && stun:
		rec = &journalRecord{Op: "reset", Disk: disk, Seq: lj.state.seq, UUID: newCBTUUID()}
	case !want && lj.state.current != "":
		rec = &journalRecord{Op: "off", Disk: disk, Seq: lj.state.seq}
	}
	if rec == nil {
		return nil
	}
	if err := lj.appendRecord(*rec); err != nil {
		return err
	}
	return lj.state.apply(*rec)
}

func (l *Lab) syncAll() {
	for _, e := range simulator.Map.All("VirtualMachine") {
		vm, ok := e.(*simulator.VirtualMachine)
		if !ok {
			continue
		}
		simulator.Map.WithLock(vm, func() { l.syncVM(vm) })
	}
}

// PutObject implements simulator.RegisterObject: freeze the disks of each new snapshot.
// It runs inside the simulator's CreateSnapshot task, which holds the VM's lock.
func (l *Lab) PutObject(obj mo.Reference) {
	if task, ok := obj.(*simulator.Task); ok {
		fixTaskEntity(task)
		return
	}
	snap, ok := obj.(*simulator.VirtualMachineSnapshot)
	if !ok {
		return
	}
	vm, ok := simulator.Map.Get(snap.Vm).(*simulator.VirtualMachine)
	if !ok {
		return
	}
	// The simulator's snapshot config is a shallow copy of the VM's: give the snapshot its own
	// disk devices before changing their backings.
	devices := make([]types.BaseVirtualDevice, len(snap.Config.Hardware.Device))
	var files []string
	journals := make(map[int32]string)
	for i, dev := range snap.Config.Hardware.Device {
		devices[i] = dev
		d, ok := dev.(*types.VirtualDisk)
		if !ok || flatBacking(d) == nil {
			continue
		}
		frozen, created, err := l.freeze(snap.Self, vm.Config, d)
		files = append(files, created...)
		if err != nil {
			log.Printf("lab: snapshot %s of %s: disk %d: %v", snap.Self.Value, vm.Name, d.Key, err)
			continue
		}
		devices[i] = frozen
		if desc, err := l.resolve(flatBacking(d).FileName); err == nil {
			_, journals[d.Key] = diskFiles(desc)
		}
	}
	snap.Config.Hardware.Device = devices
	l.mu.Lock()
	l.snapFiles[snap.Self] = files
	l.snapJour[snap.Self] = journals
	l.mu.Unlock()
}

// fixTaskEntity makes tasks on a snapshot (RemoveSnapshot_Task, RevertToSnapshot_Task) name the
// VM as their entity, as vSphere does. The simulator names the snapshot, which is no ManagedEntity,
// and pyvmomi then refuses to decode the TaskInfo.
func fixTaskEntity(task *simulator.Task) {
	e := task.Info.Entity
	if e == nil || e.Type != "VirtualMachineSnapshot" {
		return
	}
	snap, ok := simulator.Map.Get(*e).(*simulator.VirtualMachineSnapshot)
	if !ok {
		return
	}
	vmRef := snap.Vm
	task.Info.Entity = &vmRef
	if vm, ok := simulator.Map.Get(vmRef).(*simulator.VirtualMachine); ok {
		task.Info.EntityName = vm.Name
	}
}

// freeze copies a disk's raw extent to "<name>-<snapshot>-flat.vmdk" (with its descriptor) under
// the journal lock and returns the snapshot's copy of the disk pointing at it, with the change ID.
func (l *Lab) freeze(snap types.ManagedObjectReference, cfg *types.VirtualMachineConfigInfo,
	d *types.VirtualDisk) (*types.VirtualDisk, []string, error) {
	b := flatBacking(d)
	lj, err := l.openJournal(b.FileName)
	if err != nil {
		return nil, nil, err
	}
	defer lj.close()
	if err := l.reconcile(lj, cfg, d, true); err != nil { // a snapshot stuns the VM
		return nil, nil, err
	}
	b.ChangeId = lj.state.changeID()

	snapDS := strings.TrimSuffix(b.FileName, ".vmdk") + "-" + snap.Value + ".vmdk"
	desc, err := l.resolve(b.FileName)
	if err != nil {
		return nil, nil, err
	}
	snapDesc, err := l.resolve(snapDS)
	if err != nil {
		return nil, nil, err
	}
	flat, _ := diskFiles(desc)
	snapFlat, _ := diskFiles(snapDesc)
	created := []string{snapFlat, snapDesc}
	out, err := exec.Command("cp", "--reflink=auto", "--sparse=always", flat, snapFlat).CombinedOutput()
	if err != nil {
		return nil, created, fmt.Errorf("cp: %v: %s", err, out)
	}
	if err := writeDescriptor(snapDesc, filepath.Base(snapFlat), diskCapacity(d)); err != nil {
		return nil, created, err
	}

	nd := *d
	nb := *b
	nb.FileName = snapDS
	nb.ChangeId = lj.state.changeID()
	nd.Backing = &nb
	return &nd, created, nil
}

// writeDescriptor writes a monolithicFlat VMDK descriptor naming the raw extent.
func writeDescriptor(path, extent string, capacity int64) error {
	text := fmt.Sprintf("# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"+
		"createType=\"monolithicFlat\"\n\n# Extent description\nRW %d FLAT \"%s\" 0\n", capacity/512, extent)
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(text), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// UpdateObject implements simulator.RegisterObject.
func (l *Lab) UpdateObject(mo.Reference, []types.PropertyChange) {}

// RemoveObject implements simulator.RegisterObject: a removed snapshot's frozen files go with it.
func (l *Lab) RemoveObject(ref types.ManagedObjectReference) {
	if ref.Type != "VirtualMachineSnapshot" {
		return
	}
	l.mu.Lock()
	files := l.snapFiles[ref]
	delete(l.snapFiles, ref)
	delete(l.snapJour, ref)
	l.mu.Unlock()
	for _, f := range files {
		if err := os.Remove(f); err != nil && !os.IsNotExist(err) {
			log.Printf("lab: removing %s: %v", f, err)
		}
	}
}

// ServeHTTP wraps the simulator's handler (see the top of this file).
func (l *Lab) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost || !strings.HasPrefix(r.URL.Path, "/sdk") {
		l.inner.ServeHTTP(w, r)
		return
	}
	body, err := io.ReadAll(r.Body)
	_ = r.Body.Close()
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	l.syncAll()
	readdressed := false
	if bytes.Contains(body, []byte("QueryChangedDiskAreas")) {
		body, readdressed = l.readdress(body)
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	r.ContentLength = int64(len(body))
	if !readdressed {
		l.inner.ServeHTTP(w, r)
		l.syncAll()
		return
	}
	// Faults raised before dispatch (NotAuthenticated, ...) name the call's target: put the VM back.
	rec := httptest.NewRecorder()
	l.inner.ServeHTTP(rec, r)
	out := bytes.ReplaceAll(rec.Body.Bytes(), []byte(`type="`+trackerType+`"`), []byte(`type="VirtualMachine"`))
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	w.Header().Set("Content-Length", strconv.Itoa(len(out)))
	w.WriteHeader(rec.Code)
	_, _ = w.Write(out)
}

// readdress turns a QueryChangedDiskAreas call on a VM into the same call on its companion
// tracker. Anything else, or anything it cannot decode, is passed on untouched.
func (l *Lab) readdress(body []byte) ([]byte, bool) {
	m, err := simulator.UnmarshalBody(types.TypeFunc(), body)
	if err != nil || m.Name != "QueryChangedDiskAreas" {
		return body, false
	}
	req, ok := m.Body.(*types.QueryChangedDiskAreas)
	if !ok || req.This.Type != "VirtualMachine" {
		return body, false
	}
	tracker := types.ManagedObjectReference{Type: trackerType, Value: req.This.Value}
	if simulator.Map.Get(tracker) == nil {
		simulator.Map.Put(&ChangeTracker{Self: tracker, VM: req.This, lab: l})
	}
	req.This = tracker
	out, err := xml.Marshal(soap.Envelope{Body: &methods.QueryChangedDiskAreasBody{Req: req}})
	if err != nil {
		log.Printf("lab: re-encoding QueryChangedDiskAreas: %v", err)
		return body, false
	}
	return append([]byte(xml.Header), out...), true
}

// journalOf is the journal of disk key as seen from snapshot (nil: the live disk whose descriptor is dsPath).
func (l *Lab) journalOf(snapshot *types.ManagedObjectReference, key int32, dsPath string) (string, error) {
	if snapshot != nil {
		l.mu.Lock()
		j, ok := l.snapJour[*snapshot][key]
		l.mu.Unlock()
		if !ok {
			return "", fmt.Errorf("snapshot %s has no frozen image of disk %d", snapshot.Value, key)
		}
		return j, nil
	}
	desc, err := l.resolve(dsPath)
	if err != nil {
		return "", err
	}
	_, j := diskFiles(desc)
	return j, nil
}
