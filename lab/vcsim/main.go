// Command lab-vcsim is the project's vSphere lab: the govmomi vCenter simulator (VPX model) over
// plain HTTP on loopback (HTTPS with -tls: a self-signed certificate, written to
// <dir>/vcsim-cert.pem and named in the ready line as "certificate"), with the lab extension (lab.go, qcda.go, journal.go): disks backed by
// real images in local datastore directories, snapshots that freeze those images, and
// QueryChangedDiskAreas answered from per-disk change journals.
//
// Datastores: every name given with -datastore is a local datastore mounted on all hosts, whose
// directory is <dir>/datastores/<name>, so "[LocalDS_0] vm1/vm1.vmdk" is
// <dir>/datastores/LocalDS_0/vm1/vm1.vmdk. The model itself creates no VMs; the lab creates them.
//
// When it is serving, it prints one JSON line on stdout:
//
//	{"event":"ready","url":"http://127.0.0.1:PORT/sdk","username":...,"password":...,"datastores":{...}}
//
// and runs until SIGTERM or SIGINT, or until its parent process goes away.
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"log"
	"math/big"
	"net"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/types"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "loopback address:port to serve on (port 0: any free port)")
	dir := flag.String("dir", "", "lab directory (required); datastores live in <dir>/datastores/<name>")
	dsNames := flag.String("datastore", "LocalDS_0", "comma-separated datastore names")
	user := flag.String("username", "user", "login user name")
	pass := flag.String("password", "pass", "login password")
	window := flag.Int64("qcda-window", 0, "bytes one QueryChangedDiskAreas answer covers at most (0: a third of the disk)")
	block := flag.Int64("cbt-block", 512, "change-tracking granularity in bytes")
	useTLS := flag.Bool("tls", false, "serve HTTPS with a self-signed certificate (written to <dir>/vcsim-cert.pem)")
	flag.Parse()

	if err := run(*listen, *dir, strings.Split(*dsNames, ","), *user, *pass, *window, *block, *useTLS); err != nil {
		log.Fatalf("lab-vcsim: %v", err)
	}
}

func run(listen, dir string, dsNames []string, user, pass string, window, block int64, useTLS bool) error {
	if dir == "" {
		return fmt.Errorf("-dir is required")
	}
	if block <= 0 || window < 0 {
		return fmt.Errorf("-cbt-block must be > 0 and -qcda-window >= 0")
	}
	host, _, err := net.SplitHostPort(listen)
	if err != nil {
		return err
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("-listen must be a loopback address, not %q", listen)
	}
	dir, err = filepath.Abs(dir)
	if err != nil {
		return err
	}

	model := simulator.VPX()
	model.Datastore = 0 // the lab's own, below, in known directories
	model.Machine = 0   // lab VMs only
	if err := model.Create(); err != nil {
		return err
	}

	lab := &Lab{
		Self:       types.ManagedObjectReference{Type: "LabExtension", Value: "lab"},
		datastores: make(map[string]string),
		window:     window,
		block:      block,
		journals:   newJournals(),
		snapFiles:  make(map[types.ManagedObjectReference][]string),
		snapJour:   make(map[types.ManagedObjectReference]map[int32]string),
	}
	ctx := context.Background()
	client, err := vim25.NewClient(ctx, model.Service)
	if err != nil {
		return err
	}
	for _, name := range dsNames {
		name = strings.TrimSpace(name)
		if name == "" {
			continue
		}
		path := filepath.Join(dir, "datastores", name)
		if err := os.MkdirAll(path, 0o755); err != nil {
			return err
		}
		for _, h := range simulator.Map.All("HostSystem") {
			dss, err := object.NewHostSystem(client, h.Reference()).ConfigManager().DatastoreSystem(ctx)
			if err != nil {
				return err
			}
			if _, err := dss.CreateLocalDatastore(ctx, name, path); err != nil {
				return fmt.Errorf("datastore %s on %s: %w", name, h.Entity().Name, err)
			}
		}
		lab.datastores[name] = path
	}
	simulator.Map.AddHandler(lab)

	model.Service.Listen = &url.URL{Host: listen, User: url.UserPassword(user, pass)}
	if useTLS {
		cert, err := selfSigned()
		if err != nil {
			return err
		}
		model.Service.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	}
	srv := model.Service.NewServer()
	defer srv.Close()
	certificate := ""
	if useTLS {
		certificate = filepath.Join(dir, "vcsim-cert.pem")
		der := srv.Certificate().Raw
		if err := os.WriteFile(certificate, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
			return err
		}
	}
	// Wrap the simulator's handler before any client knows the address.
	lab.inner = srv.Config.Handler
	srv.Config.Handler = lab

	ready, err := json.Marshal(map[string]interface{}{
		"event":       "ready",
		"url":         srv.URL.Scheme + "://" + srv.URL.Host + srv.URL.Path,
		"username":    user,
		"password":    pass,
		"datastores":  lab.datastores,
		"pid":         os.Getpid(),
		"certificate": certificate,
	})
	if err != nil {
		return err
	}
	fmt.Println(string(ready))

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	orphaned := make(chan struct{})
	go watchParent(orphaned)
	select {
	case <-sig:
	case <-orphaned:
		log.Printf("lab-vcsim: parent process gone, stopping")
	}
	return nil
}

// watchParent closes orphaned when the process that started us goes away (a killed test run),
// so that no simulator outlives its lab.
func watchParent(orphaned chan<- struct{}) {
	parent := os.Getppid()
	for os.Getppid() == parent {
		time.Sleep(500 * time.Millisecond)
	}
	close(orphaned)
}

// selfSigned makes the lab's certificate: ECDSA P-256, self-signed, for 127.0.0.1, ::1 and
// localhost (httptest's own is RSA-1024, which OpenSSL 3 refuses as too weak).
func selfSigned() (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 63))
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "lab-vcsim", Organization: []string{"vSphere lab"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		IPAddresses:           []net.IP{net.ParseIP("127.0.0.1"), net.IPv6loopback},
		DNSNames:              []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}
