package main

// The per-disk change journal.
//
// Every lab disk `<dir>/<name>.vmdk` (a VMDK descriptor whose raw extent is `<name>-flat.vmdk`)
// has a journal `<dir>/<name>-ctk.jsonl`, named after VMware's `<name>-ctk.vmdk`. It is a JSON-lines
// file, appended to by two writers that both hold an exclusive flock(2) on it while they append:
//
//	{"op":"write","disk":"vm1.vmdk","seq":7,"offset":1048576,"length":4096}
//	    a guest wrote these bytes (lab/guest.py); seq is the previous highest seq + 1
//	{"op":"reset","disk":"vm1.vmdk","seq":7,"uuid":"52 1f ... 9a-0c ... 44"}
//	    change tracking (re)starts: a new epoch with a new UUID, based on the current seq
//	    (written by the simulator when CBT is switched on, or by the lab to force a CBT reset)
//	{"op":"off","disk":"vm1.vmdk","seq":7}
//	    change tracking switched off: no epoch is active until the next reset
//
// A change ID is "<epoch uuid>/<seq>", like VMware's "52 de ... 04/3". Writes are recorded whether
// or not tracking is on; only those inside an epoch count for QueryChangedDiskAreas. The guest holds
// the lock across "write the bytes, append the record", and the simulator holds it across "read the
// last seq, copy the image" when it freezes a snapshot, so a snapshot's change ID always names
// exactly the writes its frozen image contains.

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"sync"
	"syscall"
)

type journalRecord struct {
	Op     string `json:"op"`
	Disk   string `json:"disk,omitempty"`
	Seq    int64  `json:"seq"`
	Offset int64  `json:"offset,omitempty"`
	Length int64  `json:"length,omitempty"`
	UUID   string `json:"uuid,omitempty"`
}

type extent struct {
	seq, offset, length int64
}

// epoch is one run of change tracking under one UUID.
type epoch struct {
	base   int64    // seq at the reset that started it
	writes []extent // writes recorded while it was the current epoch
}

// journalState is the parsed content of one journal, extended as the file grows.
type journalState struct {
	parsed  int64 // bytes of the file consumed so far
	seq     int64 // highest seq seen
	current string
	epochs  map[string]*epoch
}

// changeID is the current change ID, or "" when tracking is off.
func (s *journalState) changeID() string {
	if s.current == "" {
		return ""
	}
	return fmt.Sprintf("%s/%d", s.current, s.seq)
}

func (s *journalState) apply(r journalRecord) error {
	if r.Seq > s.seq {
		s.seq = r.Seq
	}
	switch r.Op {
	case "write":
		if r.Offset < 0 || r.Length < 0 {
			return fmt.Errorf("negative extent in write record seq %d", r.Seq)
		}
		if e := s.epochs[s.current]; s.current != "" && e != nil {
			e.writes = append(e.writes, extent{r.Seq, r.Offset, r.Length})
		}
	case "reset":
		if r.UUID == "" {
			return fmt.Errorf("reset record without uuid at seq %d", r.Seq)
		}
		s.current = r.UUID
		s.epochs[r.UUID] = &epoch{base: r.Seq}
	case "off":
		s.current = ""
	default:
		return fmt.Errorf("unknown journal op %q", r.Op)
	}
	return nil
}

// journals caches parsed journals by path; each is re-read only from where it was left.
type journals struct {
	mu     sync.Mutex
	states map[string]*journalState
}

func newJournals() *journals {
	return &journals{states: make(map[string]*journalState)}
}

// lockedJournal is a journal file held under flock; callers read or append through it.
type lockedJournal struct {
	f     *os.File
	path  string
	state *journalState
}

// open locks the journal (creating it if needed) and brings its parsed state up to date.
// The caller must call close.
func (j *journals) open(path string) (*lockedJournal, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, err
	}
	lj := &lockedJournal{f: f, path: path}
	if err := j.refresh(lj); err != nil {
		lj.close()
		return nil, err
	}
	return lj, nil
}

func (j *journals) refresh(lj *lockedJournal) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	st, ok := j.states[lj.path]
	info, err := lj.f.Stat()
	if err != nil {
		return err
	}
	if !ok || info.Size() < st.parsed {
		// New, or truncated/replaced: parse from the start.
		st = &journalState{epochs: make(map[string]*epoch)}
		j.states[lj.path] = st
	}
	if info.Size() > st.parsed {
		buf := make([]byte, info.Size()-st.parsed)
		if _, err := lj.f.ReadAt(buf, st.parsed); err != nil {
			return err
		}
		// Only whole lines count; a writer always appends whole lines under the lock.
		end := bytes.LastIndexByte(buf, '\n') + 1
		sc := bufio.NewScanner(bytes.NewReader(buf[:end]))
		sc.Buffer(make([]byte, 64*1024), 1024*1024)
		line := 0
		for sc.Scan() {
			line++
			if len(bytes.TrimSpace(sc.Bytes())) == 0 {
				continue
			}
			var r journalRecord
			if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
				return fmt.Errorf("%s: bad record after byte %d: %w", lj.path, st.parsed, err)
			}
			if err := st.apply(r); err != nil {
				return fmt.Errorf("%s: %w", lj.path, err)
			}
		}
		st.parsed += int64(end)
	}
	lj.state = st
	return nil
}

func (lj *lockedJournal) appendRecord(r journalRecord) error {
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	b = append(b, '\n')
	if _, err := lj.f.Write(b); err != nil {
		return err
	}
	return nil
}

func (lj *lockedJournal) close() {
	_ = syscall.Flock(int(lj.f.Fd()), syscall.LOCK_UN)
	_ = lj.f.Close()
}

// newCBTUUID returns a UUID formatted the way VMware prints change-tracking UUIDs:
// "52 de c0 d9 98 a8 ac 5b-a1 16 ed 5d 02 86 e1 04".
func newCBTUUID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	var out bytes.Buffer
	for i, c := range b {
		switch {
		case i == 8:
			out.WriteByte('-')
		case i > 0:
			out.WriteByte(' ')
		}
		fmt.Fprintf(&out, "%02x", c)
	}
	return out.String()
}
