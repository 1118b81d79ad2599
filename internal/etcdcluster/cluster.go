// Package etcdcluster runs an etcd cluster of 1 or 3 members inside this
// process, with the controls tests need (stop, restart, find the leader).
// It is the only package of baton that links etcd's server; the public
// face of it is coord/embedded.
package etcdcluster

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/zaplog"
	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap/zapcore"
	"golang.org/x/crypto/bcrypt"
)

// Config configures an in-process etcd cluster.
type Config struct {
	// Dir holds the members' data directories (m0, m1, m2). Empty means a
	// new temporary directory, removed by Close. A given Dir is kept, and
	// so are the member directories unless RemoveData is set. Start
	// always starts a new cluster: it refuses a Dir that already holds
	// member directories rather than overwrite or misread them.
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

// Cluster is an etcd cluster running inside this process on loopback
// ports. Its methods are safe for concurrent use. Close every client you
// created against it before calling Close: etcd waits for open client
// streams when it shuts down.
type Cluster struct {
	cfg     Config
	dir     string
	created []string // what Close removes
	logger  hclog.Logger

	mu      sync.Mutex
	members []*member
	client  *clientv3.Client
	closed  bool

	proxiesMu sync.Mutex
	proxies   []*GRPCProxy // stopped by Close, before the members
}

type member struct {
	name       string
	dir        string
	clientURL  url.URL
	peerURL    url.URL
	etcd       *embed.Etcd // nil while stopped
	startCount int
	// stopping quiets the member's logs while it is stopped on purpose:
	// etcd reports each listener it closes as an error.
	stopping atomic.Bool
}

// Start starts the cluster and returns once it has a leader and
// answers a linearizable read.
func Start(cfg Config) (*Cluster, error) {
	if cfg.Members == 0 {
		cfg.Members = 1
	}
	if cfg.Members != 1 && cfg.Members != 3 {
		return nil, fmt.Errorf("embedded etcd: %w: Config.Members (%d) must be 1 or 3", coord.ErrInvalidConfig, cfg.Members)
	}
	if cfg.LogLevel == "" {
		cfg.LogLevel = "warn"
	}
	var min zapcore.Level
	if err := min.Set(cfg.LogLevel); err != nil {
		return nil, fmt.Errorf("embedded etcd: %w: Config.LogLevel (%q): %v", coord.ErrInvalidConfig, cfg.LogLevel, err)
	}
	if cfg.StartTimeout == 0 {
		cfg.StartTimeout = 30 * time.Second
	}
	if (cfg.TLSCertFile != "" || cfg.TLSKeyFile != "" || cfg.TLSClientCAFile != "") && (cfg.TLSCertFile == "" || cfg.TLSKeyFile == "" || cfg.ClientTLS == nil) {
		return nil, fmt.Errorf("embedded etcd: %w: TLS needs Config.TLSCertFile, Config.TLSKeyFile and Config.ClientTLS", coord.ErrInvalidConfig)
	}
	e := &Cluster{cfg: cfg, logger: cfg.Logger}
	if e.logger == nil {
		e.logger = hclog.NewNullLogger()
	}
	e.dir = cfg.Dir
	if e.dir == "" {
		dir, err := os.MkdirTemp("", "baton-etcd-")
		if err != nil {
			return nil, fmt.Errorf("embedded etcd: data directory: %w", err)
		}
		e.dir = dir
		e.created = append(e.created, dir)
	}
	// Ports picked from :0 can be taken by someone else before etcd binds
	// them; start again on fresh ports when that happens.
	var err error
	for attempt := 0; attempt < 5; attempt++ {
		if err = e.startAll(); err == nil || !isAddrInUse(err) {
			break
		}
		e.logger.Debug("port taken, retrying with new ports", "error", err)
	}
	if err != nil {
		e.Close()
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), cfg.StartTimeout)
	defer cancel()
	if cfg.RootPassword != "" {
		if err := e.enableAuth(ctx); err != nil {
			e.Close()
			return nil, err
		}
	}
	e.client, err = e.NewClient(ctx)
	if err != nil {
		e.Close()
		return nil, err
	}
	return e, nil
}

// enableAuth creates the root user and turns authentication on, through a
// client of its own that has no credentials yet.
func (e *Cluster) enableAuth(ctx context.Context) error {
	cfg := coord.ClientConfig(e.Endpoints(), e.logger.Named("etcd-client"))
	cfg.TLS = e.cfg.ClientTLS
	cli, err := coord.DialConfig(ctx, cfg)
	if err != nil {
		return err
	}
	defer cli.Close()
	if _, err := cli.UserAdd(ctx, "root", e.cfg.RootPassword); err != nil {
		return fmt.Errorf("embedded etcd: add user root: %w", err)
	}
	if _, err := cli.UserGrantRole(ctx, "root", "root"); err != nil {
		return fmt.Errorf("embedded etcd: grant root the root role: %w", err)
	}
	if _, err := cli.AuthEnable(ctx); err != nil {
		return fmt.Errorf("embedded etcd: enable auth: %w", err)
	}
	return nil
}

func (e *Cluster) startAll() error {
	e.stopAll()
	e.members = nil
	ports, err := freePorts(2 * e.cfg.Members)
	if err != nil {
		return err
	}
	var cluster []string
	for i := 0; i < e.cfg.Members; i++ {
		m := &member{
			name:      fmt.Sprintf("m%d", i),
			clientURL: url.URL{Scheme: e.clientScheme(), Host: fmt.Sprintf("127.0.0.1:%d", ports[2*i])},
			peerURL:   url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", ports[2*i+1])},
		}
		m.dir = filepath.Join(e.dir, m.name)
		if _, err := os.Stat(m.dir); err == nil {
			return fmt.Errorf("embedded etcd: %w: Config.Dir (%s) already holds etcd member data %s", coord.ErrInvalidConfig, e.dir, m.dir)
		}
		e.members = append(e.members, m)
		cluster = append(cluster, m.name+"="+m.peerURL.String())
	}
	if err := e.startMembers(strings.Join(cluster, ",")); err != nil {
		// A failed attempt leaves member directories that name the old
		// ports; the next attempt must not find them.
		e.stopAll()
		for _, m := range e.members {
			os.RemoveAll(m.dir)
		}
		return err
	}
	if e.cfg.Dir != "" && e.cfg.RemoveData {
		for _, m := range e.members {
			e.created = append(e.created, m.dir)
		}
	}
	return nil
}

func (e *Cluster) clientScheme() string {
	if e.cfg.TLSCertFile != "" {
		return "https"
	}
	return "http"
}

func (e *Cluster) startMembers(initialCluster string) error {
	for _, m := range e.members {
		if err := e.startMember(m, initialCluster); err != nil {
			return err
		}
	}
	timeout := time.NewTimer(e.cfg.StartTimeout)
	defer timeout.Stop()
	for _, m := range e.members {
		select {
		case <-m.etcd.Server.ReadyNotify():
		case err := <-m.etcd.Err():
			return fmt.Errorf("embedded etcd: member %s: %w", m.name, err)
		case <-timeout.C:
			return fmt.Errorf("embedded etcd: did not become ready within %v", e.cfg.StartTimeout)
		}
	}
	return nil
}

func (e *Cluster) startMember(m *member, initialCluster string) error {
	c := embed.NewConfig()
	c.Name = m.name
	c.Dir = m.dir
	c.ListenClientUrls = []url.URL{m.clientURL}
	c.AdvertiseClientUrls = []url.URL{m.clientURL}
	c.ListenPeerUrls = []url.URL{m.peerURL}
	c.AdvertisePeerUrls = []url.URL{m.peerURL}
	c.InitialCluster = initialCluster
	if e.cfg.TLSCertFile != "" {
		c.ClientTLSInfo.CertFile, c.ClientTLSInfo.KeyFile = e.cfg.TLSCertFile, e.cfg.TLSKeyFile
		c.ClientTLSInfo.TrustedCAFile, c.ClientTLSInfo.ClientCertAuth = e.cfg.TLSClientCAFile, e.cfg.TLSClientCAFile != ""
	}
	c.InitialClusterToken = "baton-embedded"
	c.LogLevel = e.cfg.LogLevel
	var min zapcore.Level
	_ = min.Set(e.cfg.LogLevel) // validated in Start
	m.stopping.Store(false)
	c.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zaplog.NewQuietable(e.logger.Named("etcd").With("member", m.name), min, m.stopping.Load))
	if m.startCount > 0 {
		c.ClusterState = embed.ClusterStateFlagExisting
	}
	if e.cfg.FastTimings {
		c.TickMs = 10
		c.ElectionMs = 100
		c.UnsafeNoFsync = true
		// Password users log in at every stream their client opens: at
		// bcrypt's default cost (and under the race detector) that alone
		// can take longer than a 1 s lease.
		c.BcryptCost = uint(bcrypt.MinCost)
	}
	etcd, err := embed.StartEtcd(c)
	if err != nil {
		return fmt.Errorf("embedded etcd: start embedded etcd member %s: %w", m.name, err)
	}
	m.etcd = etcd
	m.startCount++
	return nil
}

// Endpoints returns the client URLs of all members, stopped ones included.
func (e *Cluster) Endpoints() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make([]string, len(e.members))
	for i, m := range e.members {
		out[i] = m.clientURL.String()
	}
	return out
}

// Endpoint returns the client URL of member i.
func (e *Cluster) Endpoint(i int) string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.members[i].clientURL.String()
}

// Client returns a client connected to all members. The Cluster owns it and
// closes it in Close; do not close it yourself.
func (e *Cluster) Client() *clientv3.Client { return e.client }

// NewClient returns a new client of all members (or of the given
// endpoints, e.g. a proxy in front of a member), configured with
// coord.ClientConfig and probed. The caller closes it, before Close.
func (e *Cluster) NewClient(ctx context.Context, endpoints ...string) (*clientv3.Client, error) {
	if len(endpoints) == 0 {
		endpoints = e.Endpoints()
	}
	cfg := coord.ClientConfig(endpoints, e.logger.Named("etcd-client"))
	cfg.TLS = e.cfg.ClientTLS
	if e.cfg.RootPassword != "" {
		cfg.Username, cfg.Password = "root", e.cfg.RootPassword
	}
	return coord.DialConfig(ctx, cfg)
}

// Stop stops member i (its data stays for Restart). With clients
// connected it can take a few seconds: etcd waits for open streams up to
// its request timeout, and a leader first hands its leadership on.
// Members can be stopped concurrently; to take the whole cluster down at
// one instant, use StopAll.
func (e *Cluster) Stop(i int) error {
	e.mu.Lock()
	if i < 0 || i >= len(e.members) {
		e.mu.Unlock()
		return fmt.Errorf("embedded etcd: no member %d", i)
	}
	m := e.members[i]
	etcd := m.etcd
	m.etcd = nil
	m.stopping.Store(true)
	e.mu.Unlock()
	if etcd == nil {
		return fmt.Errorf("embedded etcd: member %d is already stopped", i)
	}
	etcd.Close()
	return nil
}

// StopAll stops every running member as a power cut would: each raft node
// stops at once, with no leadership transfer, so the cluster stops
// applying (and expiring leases) at one instant; only then do the
// listeners close, which can take a few seconds with clients connected.
// A peer request that reaches a member between its stop and the close of
// its listeners can leave a goroutine of etcd's peer handler blocked for
// good (etcdhttp's version handler, on the closed backend); tests that
// use StopAll tell goleak to ignore it.
func (e *Cluster) StopAll() {
	e.mu.Lock()
	var stopping []*embed.Etcd
	for _, m := range e.members {
		if m.etcd != nil {
			stopping = append(stopping, m.etcd)
			m.etcd = nil
			m.stopping.Store(true)
		}
	}
	e.mu.Unlock()
	var wg sync.WaitGroup
	for _, etcd := range stopping {
		wg.Go(etcd.Server.HardStop)
	}
	wg.Wait()
	for _, etcd := range stopping {
		wg.Go(etcd.Close)
	}
	wg.Wait()
}

// Restart starts stopped member i again on its old ports and data, and
// waits until it has rejoined the cluster or ctx ends.
func (e *Cluster) Restart(ctx context.Context, i int) error {
	e.mu.Lock()
	if i < 0 || i >= len(e.members) {
		e.mu.Unlock()
		return fmt.Errorf("embedded etcd: no member %d", i)
	}
	m := e.members[i]
	if m.etcd != nil {
		e.mu.Unlock()
		return fmt.Errorf("embedded etcd: member %d is running", i)
	}
	var cluster []string
	for _, o := range e.members {
		cluster = append(cluster, o.name+"="+o.peerURL.String())
	}
	err := e.startMember(m, strings.Join(cluster, ","))
	etcd := m.etcd
	e.mu.Unlock()
	if err != nil {
		return err
	}
	select {
	case <-etcd.Server.ReadyNotify():
		return nil
	case err := <-etcd.Err():
		return fmt.Errorf("embedded etcd: member %d: %w", i, err)
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Leader returns the index of the member that is raft leader, as seen by
// the running members, waiting until they agree on one or ctx ends.
func (e *Cluster) Leader(ctx context.Context) (int, error) {
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		if i, ok := e.agreedLeader(); ok {
			return i, nil
		}
		select {
		case <-ctx.Done():
			return -1, fmt.Errorf("embedded etcd: has no leader: %w", ctx.Err())
		case <-tick.C:
		}
	}
}

func (e *Cluster) agreedLeader() (int, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	leader := -1
	for _, m := range e.members {
		if m.etcd == nil {
			continue
		}
		lead := m.etcd.Server.Lead()
		idx := -1
		for j, o := range e.members {
			if o.etcd != nil && uint64(o.etcd.Server.MemberID()) == lead {
				idx = j
			}
		}
		if idx < 0 || (leader >= 0 && idx != leader) {
			return -1, false
		}
		leader = idx
	}
	return leader, leader >= 0
}

// StopLeader stops the current raft leader and returns its index.
func (e *Cluster) StopLeader(ctx context.Context) (int, error) {
	i, err := e.Leader(ctx)
	if err != nil {
		return -1, err
	}
	return i, e.Stop(i)
}

// Close closes the Cluster's own client, stops every member and removes what
// it created. It is idempotent.
func (e *Cluster) Close() error {
	e.proxiesMu.Lock()
	proxies := e.proxies
	e.proxies = nil
	e.proxiesMu.Unlock()
	for _, p := range proxies {
		p.Stop()
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return nil
	}
	e.closed = true
	if e.client != nil {
		e.client.Close()
	}
	e.stopAll()
	var errs []error
	for _, dir := range e.created {
		errs = append(errs, os.RemoveAll(dir))
	}
	return errors.Join(errs...)
}

func (e *Cluster) stopAll() {
	var wg sync.WaitGroup
	for _, m := range e.members {
		if m.etcd == nil {
			continue
		}
		m.stopping.Store(true)
		wg.Go(m.etcd.Close)
		m.etcd = nil
	}
	wg.Wait()
}

// freePorts returns n distinct loopback ports that were free a moment ago.
func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	ports := make([]int, 0, n)
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("embedded etcd: pick a free port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

func isAddrInUse(err error) bool {
	return errors.Is(err, syscall.EADDRINUSE) || strings.Contains(err.Error(), "address already in use")
}

// MemberDir returns the data directory of member i.
func (e *Cluster) MemberDir(i int) string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.members[i].dir
}
