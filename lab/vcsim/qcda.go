package main

// QueryChangedDiskAreas, answered from the journal (changed areas) or from the frozen image's
// allocation map (changeId "*"), one window of the disk per answer, so that callers must loop
// on startOffset = answer.startOffset + answer.length the way they must against a real vCenter.

import (
	"errors"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"syscall"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

const (
	seekData = 3 // SEEK_DATA
	seekHole = 4 // SEEK_HOLE
)

// ChangeTracker is the companion object of one VM that answers QueryChangedDiskAreas for it.
type ChangeTracker struct {
	Self types.ManagedObjectReference
	VM   types.ManagedObjectReference
	lab  *Lab
}

func (t *ChangeTracker) Reference() types.ManagedObjectReference { return t.Self }

type qcdaFault struct {
	msg   string
	fault types.BaseMethodFault
}

func invalidArgument(prop, format string, args ...interface{}) *qcdaFault {
	return &qcdaFault{fmt.Sprintf(format, args...), &types.InvalidArgument{InvalidProperty: prop}}
}

func fileFault(file, format string, args ...interface{}) *qcdaFault {
	return &qcdaFault{fmt.Sprintf(format, args...), &types.FileFault{File: file}}
}

func (t *ChangeTracker) QueryChangedDiskAreas(ctx *simulator.Context, req *types.QueryChangedDiskAreas) soap.HasFault {
	body := &methods.QueryChangedDiskAreasBody{}
	info, f := t.query(req)
	if f != nil {
		body.Fault_ = simulator.Fault(f.msg, f.fault)
		return body
	}
	body.Res = &types.QueryChangedDiskAreasResponse{Returnval: *info}
	return body
}

func (t *ChangeTracker) query(req *types.QueryChangedDiskAreas) (*types.DiskChangeInfo, *qcdaFault) {
	vm, ok := simulator.Map.Get(t.VM).(*simulator.VirtualMachine)
	if !ok {
		return nil, &qcdaFault{"no such VM", &types.ManagedObjectNotFound{Obj: t.VM}}
	}

	// The disk as of the snapshot (its frozen copy), or as it is now without one.
	var disk *types.VirtualDisk
	find := func(devices []types.BaseVirtualDevice) {
		for _, dev := range devices {
			if d, ok := dev.(*types.VirtualDisk); ok && d.Key == req.DeviceKey {
				disk = d
			}
		}
	}
	if req.Snapshot != nil {
		snap, ok := simulator.Map.Get(*req.Snapshot).(*simulator.VirtualMachineSnapshot)
		if !ok {
			return nil, &qcdaFault{"no such snapshot", &types.ManagedObjectNotFound{Obj: *req.Snapshot}}
		}
		if snap.Vm != t.VM {
			return nil, invalidArgument("snapshot", "snapshot %s is not a snapshot of %s", snap.Self.Value, t.VM.Value)
		}
		find(snap.Config.Hardware.Device)
	} else {
		simulator.Map.WithLock(vm, func() {
			find(vm.Config.Hardware.Device)
			if disk != nil {
				c := *disk
				b := *flatBacking(disk)
				c.Backing = &b
				disk = &c
			}
		})
	}
	if disk == nil || flatBacking(disk) == nil {
		return nil, invalidArgument("deviceKey", "no flat disk with key %d", req.DeviceKey)
	}
	b := flatBacking(disk)
	capacity := diskCapacity(disk)
	if req.StartOffset < 0 || req.StartOffset >= capacity {
		return nil, invalidArgument("startOffset", "startOffset %d outside the disk (%d bytes)", req.StartOffset, capacity)
	}
	window := t.lab.window
	if window <= 0 {
		window = (capacity + 2) / 3
	}
	window = roundUp(window, t.lab.block)
	start := req.StartOffset
	end := start + window
	if end > capacity {
		end = capacity
	}

	desc, err := t.lab.resolve(b.FileName)
	if err != nil {
		return nil, fileFault(b.FileName, "%v", err)
	}
	flat, _ := diskFiles(desc)

	var areas []types.DiskChangeExtent
	if req.ChangeId == "*" {
		areas, err = allocated(flat, start, end)
		if err != nil {
			return nil, fileFault(b.FileName, "reading allocation of %s: %v", flat, err)
		}
	} else {
		journal, err := t.lab.journalOf(req.Snapshot, req.DeviceKey, b.FileName)
		if err != nil {
			return nil, fileFault(b.FileName, "%v", err)
		}
		var f *qcdaFault
		areas, f = t.changed(b, journal, req.ChangeId, start, end)
		if f != nil {
			return nil, f
		}
	}
	return &types.DiskChangeInfo{StartOffset: start, Length: end - start, ChangedArea: areas}, nil
}

func parseChangeID(id string) (string, int64, bool) {
	i := strings.LastIndexByte(id, '/')
	if i <= 0 {
		return "", 0, false
	}
	seq, err := strconv.ParseInt(id[i+1:], 10, 64)
	if err != nil || seq < 0 {
		return "", 0, false
	}
	return id[:i], seq, true
}

// changed lists the areas in [start, end) written after changeId and up to the disk state at hand.
func (t *ChangeTracker) changed(b *types.VirtualDiskFlatVer2BackingInfo, journal, changeID string,
	start, end int64) ([]types.DiskChangeExtent, *qcdaFault) {
	if b.ChangeId == "" {
		return nil, fileFault(b.FileName, "change tracking is not enabled for %s", b.FileName)
	}
	uuid, seq, ok := parseChangeID(changeID)
	if !ok {
		return nil, invalidArgument("changeId", "malformed change ID %q", changeID)
	}
	curUUID, curSeq, ok := parseChangeID(b.ChangeId)
	if !ok {
		return nil, fileFault(b.FileName, "corrupt change ID %q on %s", b.ChangeId, b.FileName)
	}
	if uuid != curUUID {
		// What vSphere does after a CBT reset: the old change IDs are meaningless.
		return nil, fileFault(b.FileName, "change ID %q is from another change-tracking epoch than %q (CBT was reset)",
			changeID, b.ChangeId)
	}
	if seq > curSeq {
		return nil, invalidArgument("changeId", "change ID %q is newer than the disk state %q", changeID, b.ChangeId)
	}

	lj, err := t.lab.journals.open(journal)
	if err != nil {
		return nil, fileFault(journal, "%v", err)
	}
	ep := lj.state.epochs[uuid]
	var writes []extent
	if ep != nil {
		writes = append(writes, ep.writes...)
	}
	lj.close()
	if ep == nil {
		return nil, fileFault(journal, "change-tracking epoch %q missing from %s", uuid, journal)
	}
	if seq < ep.base {
		return nil, invalidArgument("changeId", "change ID %q predates its epoch (base %d)", changeID, ep.base)
	}

	blk := t.lab.block
	var spans []types.DiskChangeExtent
	for _, w := range writes {
		if w.seq <= seq || w.seq > curSeq || w.length == 0 {
			continue
		}
		s := w.offset / blk * blk
		e := roundUp(w.offset+w.length, blk)
		if s < start {
			s = start
		}
		if e > end {
			e = end
		}
		if s < e {
			spans = append(spans, types.DiskChangeExtent{Start: s, Length: e - s})
		}
	}
	return merge(spans), nil
}

func roundUp(n, to int64) int64 {
	return (n + to - 1) / to * to
}

func merge(spans []types.DiskChangeExtent) []types.DiskChangeExtent {
	sort.Slice(spans, func(i, j int) bool { return spans[i].Start < spans[j].Start })
	var out []types.DiskChangeExtent
	for _, s := range spans {
		if n := len(out); n > 0 && s.Start <= out[n-1].Start+out[n-1].Length {
			last := &out[n-1]
			if e := s.Start + s.Length; e > last.Start+last.Length {
				last.Length = e - last.Start
			}
			continue
		}
		out = append(out, s)
	}
	return out
}

// allocated lists the data (non-hole) areas of a file within [start, end), via SEEK_DATA/SEEK_HOLE.
func allocated(path string, start, end int64) ([]types.DiskChangeExtent, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fd := int(f.Fd())
	var out []types.DiskChangeExtent
	pos := start
	for pos < end {
		data, err := syscall.Seek(fd, pos, seekData)
		if errors.Is(err, syscall.ENXIO) {
			break // no data after pos
		}
		if err != nil {
			return nil, err
		}
		if data >= end {
			break
		}
		hole, err := syscall.Seek(fd, data, seekHole)
		if err != nil {
			return nil, err
		}
		if hole > end {
			hole = end
		}
		out = append(out, types.DiskChangeExtent{Start: data, Length: hole - data})
		pos = hole
	}
	return out, nil
}
