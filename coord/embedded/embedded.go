// Package embedded runs etcd inside the calling process, for demos, tests
// and single-machine setups. It is the only package of baton that links
// etcd's server: programs that reach a real etcd cluster import coord,
// election, server and worker, never this.
//
//	etcd, err := embedded.Start(embedded.Config{})
//	if err != nil { ... }
//	defer etcd.Close()
//	cli := etcd.Client() // or etcd.NewClient(ctx) for a client of your own
package embedded

import (
	"context"
	"crypto/tls"
	"time"

	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/internal/etcdcluster"
)

// Config configures an embedded etcd.
type Config struct {
	// Dir holds the members' data directories (m0, m1, m2). Empty means a
	// new temporary directory, removed by Close. A given Dir is kept, and
	// so are the member directories unless RemoveData is set. Start
	// always starts a new cluster: it refuses a Dir that already holds
	// member directories (coord.ErrInvalidConfig) rather than overwrite
	// or misread them.
	Dir string
	// RemoveData makes Close remove the member directories it created in
	// a given Dir. Ignored when Dir is empty (always removed).
	RemoveData bool
	// Members is the number of etcd members: 1 (default) or 3.
	Members int
	// FastTimings makes the cluster suitable for tests: a 10 ms heartbeat,
	// a 100 ms election timeout, no fsync and the cheapest password
	// hashing, so leases can be as short as 1 s. Default false: etcd's own timings (100 ms heartbeat, 1 s
	// election timeout, fsync), with which etcd grants no lease below 2 s.
	FastTimings bool
	// Logger receives etcd's own logs at LogLevel and above. Nil discards
	// them: an embedded etcd never writes to stderr on its own.
	Logger hclog.Logger
	// LogLevel is the lowest etcd log level forwarded: "debug", "info",
	// "warn" (default) or "error".
	LogLevel string
	// StartTimeout bounds how long Start waits for the cluster to elect a
	// leader. Default 30 s.
	StartTimeout time.Duration
	// TLSCertFile and TLSKeyFile, if set, make the members serve clients
	// over TLS only (https:// endpoints) with this certificate; with
	// TLSClientCAFile set as well they require a client certificate
	// signed by that CA. Peers talk plaintext on loopback. PEM files.
	TLSCertFile, TLSKeyFile, TLSClientCAFile string
	// ClientTLS is the TLS configuration of the cluster's own clients
	// (Client, NewClient): it must trust the members' certificate and,
	// with TLSClientCAFile, present a client certificate. Required with
	// TLSCertFile.
	ClientTLS *tls.Config
	// RootPassword, if set, turns etcd's authentication on: Start creates
	// the user root with this password and the root role, then enables
	// auth. The cluster's own clients log in as root.
	RootPassword string
}

// Etcd is an etcd cluster running inside this process on loopback ports.
// Its methods are safe for concurrent use.
type Etcd struct {
	c *etcdcluster.Cluster
}

// Start starts the cluster and returns once it has a leader and answers
// a linearizable read. Close it when done.
func Start(cfg Config) (*Etcd, error) {
	c, err := etcdcluster.Start(etcdcluster.Config(cfg))
	if err != nil {
		return nil, err
	}
	return &Etcd{c: c}, nil
}

// Endpoints returns the members' client URLs.
func (e *Etcd) Endpoints() []string { return e.c.Endpoints() }

// Client returns a client of all members. The Etcd owns it and closes it
// in Close; do not close it yourself.
func (e *Etcd) Client() *clientv3.Client { return e.c.Client() }

// NewClient returns a new client of all members, configured with
// coord.ClientConfig and probed. Close it yourself, before Close.
func (e *Etcd) NewClient(ctx context.Context) (*clientv3.Client, error) {
	return e.c.NewClient(ctx)
}

// Close closes the Etcd's own client, stops every member (etcd waits for
// the open streams of clients you did not close) and removes what Start
// created. It is idempotent.
func (e *Etcd) Close() error { return e.c.Close() }
