package server

import (
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"math"
	"net/http"
	"os"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/election"
)

// ErrInvalidConfig is coord.ErrInvalidConfig, the one error every baton
// package returns for a configuration field out of range; the message
// names the field and its value.
var ErrInvalidConfig = coord.ErrInvalidConfig

// Config configures a Node.
type Config struct {
	// Client is the caller's etcd client; the node never closes it.
	// Required.
	Client *clientv3.Client
	// Prefix is the etcd key prefix. Default coord.DefaultPrefix.
	Prefix string
	// ServerID names this server; it must be unique among live servers.
	// Default: hostname plus random hex, fixed for the node's lifetime.
	ServerID string
	// TTL is the lease TTL, whole seconds, at least 1 s. Default 5 s.
	TTL time.Duration
	// Listen is the address the node's own HTTP server listens on for
	// baton's endpoints, such as ":7700" or "127.0.0.1:0" (PowerJob's web
	// port). Empty means no listener: mount Handler() in your own server
	// and set Control.
	Listen string
	// TLS, if set, makes the Listen listener serve HTTPS with it (its
	// Certificates, and ClientAuth if peers and workers must present
	// certificates); Control.TLS is then set for you. A node mounted in
	// your own server serves whatever that server serves: set Control.TLS
	// when it is HTTPS.
	TLS *tls.Config
	// HTTPClient sends this node's pings to peers; with TLS it must trust
	// their certificates. Nil means http.DefaultClient.
	HTTPClient *http.Client
	// Control is where peers and workers reach baton's endpoints
	// (/server/* for discovery, /friend/ping): the addresses to list in
	// workers' server lists. Default, with Listen: the listener's address
	// (loopback when listening on all interfaces — set it explicitly in a
	// real deployment). ExternalAddress is what workers behind NAT use.
	Control coord.Endpoint
	// Protocols are the scheduler's transport addresses, one per protocol
	// its workers may speak ("HTTP", "AKKA", any name): a worker's acquire
	// is answered with the owner's address for the protocol it names, and
	// the worker then sends all its traffic there (PowerJob's heartbeats,
	// status and log reports). Default: HTTP at Control — right only when
	// the scheduler receives that traffic in the same HTTP server as
	// baton's endpoints. ExternalAddress is what workers behind NAT get.
	Protocols coord.Protocols
	// Election tunes the elector; zero fields take the defaults of
	// election.DefaultTuning. The node wires the rest of the elector
	// (its id, protocols, pinger, callbacks, logger and metrics) itself.
	Election election.Tuning
	// Callbacks are this server's ownership callbacks (see
	// election.Callbacks).
	Callbacks election.Callbacks
	// Balance places an app that has no live owner on its preferred live
	// server (coord.RankWeighted over the servers' weights) when a worker
	// asks for it, instead of on the server the worker happened to ask:
	// see election.Elector.Place. It also rebalances: when the live
	// servers change (one joins, leaves, changes weight or is cordoned)
	// and then stay unchanged for Election.RebalanceSettle, each server
	// hands the apps whose preferred server is now another to it, at
	// most Election.RebalanceRate of its apps per second (see
	// election.Config.Rebalance). DefaultConfig turns it on; false keeps
	// PowerJob's first-come placement and never moves an app.
	Balance bool
	// Weight is this server's share of apps relative to the others' when
	// balancing (its membership record's weight). Default 1; must be
	// positive (cordon a server to give it no apps: Node.Cordon).
	Weight float64
	// CheckOfferedAddresses lets /server/checkConnectivity check any
	// address a worker offers, as PowerJob's server does, instead of only
	// the requester's own IP (the default). PowerJob workers offer every
	// address of their host and bind to the first the server reaches; with
	// the default, a worker that reaches the server through another
	// interface, a NAT or loopback never gets a yes and falls back to its
	// default address. What it exposes: anyone who can call the node can
	// make it open TCP connections to any host and port it can reach (at
	// most 20 a second per node, 1 s to connect, 2 s for the answer),
	// though it learns only whether a PowerJob worker answered "pong"
	// there.
	CheckOfferedAddresses bool
	// AdminToken enables the admin routes under /admin/ for requests that
	// carry "Authorization: Bearer <AdminToken>". Empty: the routes answer
	// 404.
	AdminToken string
	// HTTPTimeouts bound the standalone listener's requests. Zero fields
	// take the defaults of DefaultHTTPTimeouts.
	HTTPTimeouts HTTPTimeouts
	// Logger receives the node's logs; nil discards them.
	Logger hclog.Logger
	// Registerer, if set, receives the node's metrics — the elector's,
	// the session's and the HTTP API's, listed in the package
	// documentation — from Start until Close (or a crash, servertest.Crash).
	Registerer prometheus.Registerer
}

// HTTPTimeouts are the standalone listener's limits.
type HTTPTimeouts struct {
	ReadHeader time.Duration // default 5 s
	Read       time.Duration // default 10 s
	Write      time.Duration // default 15 s
	Idle       time.Duration // default 60 s
	// Answer bounds the work behind a worker's request: an acquire's
	// election, and (half of it) an assert's registry lookup. Default 4 s,
	// under the 5 s a PowerJob worker waits for an answer: past it the
	// worker is told "no" (acquire) or its connection dropped (assert), and
	// it asks its next server instead of timing out. Must be below Write.
	Answer time.Duration
	// MaxHeaderBytes bounds a request's headers: over it the answer is
	// 431 in the usual envelope (past 64 KiB, or this if larger, the
	// standalone listener's Go server answers 431 itself). Default 16 KiB.
	MaxHeaderBytes int
}

// DefaultHTTPTimeouts returns the listener's default limits.
func DefaultHTTPTimeouts() HTTPTimeouts {
	return HTTPTimeouts{ReadHeader: 5 * time.Second, Read: 10 * time.Second, Write: 15 * time.Second, Idle: 60 * time.Second, Answer: 4 * time.Second, MaxHeaderBytes: 16 << 10}
}

// DefaultConfig returns a Config with every default filled in except the
// client.
func DefaultConfig() Config {
	return Config{
		TTL:          5 * time.Second,
		Balance:      true,
		Weight:       1,
		Election:     election.DefaultTuning(),
		HTTPTimeouts: DefaultHTTPTimeouts(),
	}
}

func (c Config) withDefaults() (Config, error) {
	if c.Client == nil {
		return c, fmt.Errorf("server: %w: Client is nil", ErrInvalidConfig)
	}
	if err := coord.ValidatePrefix(c.Prefix); err != nil {
		return c, fmt.Errorf("server: %w: Prefix (%q): %v", ErrInvalidConfig, c.Prefix, err)
	}
	if c.TTL == 0 {
		c.TTL = 5 * time.Second
	}
	if err := coord.ValidateTTL(c.TTL); err != nil {
		return c, fmt.Errorf("server: %w: TTL (%v): %v", ErrInvalidConfig, c.TTL, err)
	}
	if err := c.Election.Validate(); err != nil {
		return c, fmt.Errorf("server: Election: %w", err)
	}
	if c.Weight == 0 {
		c.Weight = 1
	}
	if c.Weight < 0 || math.IsNaN(c.Weight) || math.IsInf(c.Weight, 0) {
		return c, fmt.Errorf("server: %w: Weight (%v) must be a positive number", ErrInvalidConfig, c.Weight)
	}
	if c.ServerID == "" {
		c.ServerID = generatedID()
	}
	if err := coord.ValidateName(c.ServerID); err != nil {
		return c, fmt.Errorf("server: %w: ServerID (%q): %v", ErrInvalidConfig, c.ServerID, err)
	}
	if c.TLS != nil && c.Listen == "" {
		return c, fmt.Errorf("server: %w: TLS is set but Listen is empty: a mounted node serves whatever your server serves (set Control.TLS)", ErrInvalidConfig)
	}
	if c.TLS != nil && len(c.TLS.Certificates) == 0 && c.TLS.GetCertificate == nil {
		return c, fmt.Errorf("server: %w: TLS has no certificate", ErrInvalidConfig)
	}
	if c.Control.Address == "" && c.Listen == "" {
		return c, fmt.Errorf("server: %w: Control.Address and Listen are empty: set one of them", ErrInvalidConfig)
	}
	if c.Control.Address != "" {
		if err := validHostPort(c.Control.Address); err != nil {
			return c, fmt.Errorf("server: %w: Control.Address (%q): %v", ErrInvalidConfig, c.Control.Address, err)
		}
	}
	if len(c.Protocols) > 0 {
		if err := c.Protocols.Validate(); err != nil {
			return c, fmt.Errorf("server: %w: Protocols: %v", ErrInvalidConfig, err)
		}
	}
	for name, ep := range c.Protocols {
		for _, a := range []string{ep.Address, ep.ExternalAddress} {
			if err := validHostPort(a); a != "" && err != nil {
				return c, fmt.Errorf("server: %w: Protocols[%q] address %q: %v", ErrInvalidConfig, name, a, err)
			}
		}
	}
	if err := validHostPort(c.Control.ExternalAddress); c.Control.ExternalAddress != "" && err != nil {
		return c, fmt.Errorf("server: %w: Control.ExternalAddress (%q): %v", ErrInvalidConfig, c.Control.ExternalAddress, err)
	}
	d := DefaultHTTPTimeouts()
	t := &c.HTTPTimeouts
	for _, f := range []struct {
		v   *time.Duration
		def time.Duration
	}{{&t.ReadHeader, d.ReadHeader}, {&t.Read, d.Read}, {&t.Write, d.Write}, {&t.Idle, d.Idle}, {&t.Answer, d.Answer}} {
		if *f.v == 0 {
			*f.v = f.def
		}
		if *f.v < 0 {
			return c, fmt.Errorf("server: %w: HTTPTimeouts has a negative timeout (%v)", ErrInvalidConfig, *f.v)
		}
	}
	if t.Answer >= t.Write {
		return c, fmt.Errorf("server: %w: HTTPTimeouts.Answer (%v) must be below HTTPTimeouts.Write (%v)", ErrInvalidConfig, t.Answer, t.Write)
	}
	if t.MaxHeaderBytes == 0 {
		t.MaxHeaderBytes = d.MaxHeaderBytes
	}
	if c.Logger == nil {
		c.Logger = hclog.NewNullLogger()
	}
	return c, nil
}

// generatedID is hostname-<8 random hex digits>.
func generatedID() string {
	host, err := os.Hostname()
	if err != nil || coord.ValidateName(host) != nil || len(host) > 100 {
		host = "baton"
	}
	var b [4]byte
	_, _ = rand.Read(b[:])
	return host + "-" + hex.EncodeToString(b[:])
}
