package main

import (
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"testing"

	"github.com/vmware/govmomi/vim25/types"
)

func TestJournalEpochsAndIncrementalParse(t *testing.T) {
	path := filepath.Join(t.TempDir(), "d-ctk.jsonl")
	js := newJournals()
	appendLines := func(lines string) {
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := f.WriteString(lines); err != nil {
			t.Fatal(err)
		}
	}
	appendLines(`{"op":"write","seq":1,"offset":0,"length":10}` + "\n" +
		`{"op":"reset","seq":1,"uuid":"aa"}` + "\n" +
		`{"op":"write","seq":2,"offset":512,"length":512}` + "\n" +
		`{"op":"write","seq":3,"offset":4096`) // torn last line: not read yet
	lj, err := js.open(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := lj.state.changeID(); got != "aa/2" {
		t.Fatalf("change ID %q", got)
	}
	lj.close()

	appendLines(`,"length":1}` + "\n" + `{"op":"off","seq":3}` + "\n" + `{"op":"reset","seq":3,"uuid":"bb"}` + "\n")
	lj, err = js.open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer lj.close()
	if got := lj.state.changeID(); got != "bb/3" {
		t.Fatalf("change ID %q", got)
	}
	want := []extent{{2, 512, 512}, {3, 4096, 1}}
	if got := lj.state.epochs["aa"].writes; !reflect.DeepEqual(got, want) {
		t.Fatalf("epoch aa writes %v, want %v", got, want)
	}
	if n := len(lj.state.epochs["bb"].writes); n != 0 || lj.state.epochs["bb"].base != 3 {
		t.Fatalf("epoch bb: %+v", lj.state.epochs["bb"])
	}
}

func TestMerge(t *testing.T) {
	got := merge([]types.DiskChangeExtent{{Start: 100, Length: 10}, {Start: 0, Length: 50}, {Start: 50, Length: 5}, {Start: 105, Length: 1}})
	want := []types.DiskChangeExtent{{Start: 0, Length: 55}, {Start: 100, Length: 10}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("merge: %v", got)
	}
}

func TestAllocated(t *testing.T) {
	path := filepath.Join(t.TempDir(), "img")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(1 << 20); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(make([]byte, 4096), 0); err != nil { // zeros written are still data
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("x"), 512<<10); err != nil {
		t.Fatal(err)
	}
	f.Close()
	got, err := allocated(path, 0, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].Start != 0 || got[1].Start > 512<<10 || got[1].Start+got[1].Length <= 512<<10 {
		t.Fatalf("allocated: %v", got)
	}
	clipped, _ := allocated(path, 8192, 512<<10)
	if len(clipped) != 0 {
		t.Fatalf("clipped: %v", clipped)
	}
}

func TestCBTUUIDLooksLikeVMware(t *testing.T) {
	re := regexp.MustCompile(`^[0-9a-f]{2}( [0-9a-f]{2}){7}-[0-9a-f]{2}( [0-9a-f]{2}){7}$`)
	if u := newCBTUUID(); !re.MatchString(u) {
		t.Fatalf("uuid %q", u)
	}
	if id, seq, ok := parseChangeID(newCBTUUID() + "/42"); !ok || seq != 42 || !re.MatchString(id) {
		t.Fatalf("parse: %q %d %v", id, seq, ok)
	}
	for _, bad := range []string{"*", "x", "/3", "aa/-1", "aa/b"} {
		if _, _, ok := parseChangeID(bad); ok {
			t.Fatalf("parsed %q", bad)
		}
	}
}
