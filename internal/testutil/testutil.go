// Package testutil holds what baton's tests share: loggers routed to the
// test, embedded etcd clusters and fault-injection proxies.
package testutil

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/batonhq/baton/internal/etcdcluster"
	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/pkg/v3/proxy"
	"go.uber.org/zap"
)

// Logger returns an hclog logger that writes through t.Log (and to stderr
// with BATON_TEST_LOG=stderr) and goes quiet
// once the test has finished (a straggling etcd goroutine must not make
// the test binary panic). For a fuzz test it discards everything: f.Log
// may not be called while the fuzz target runs.
func Logger(t testing.TB) hclog.Logger {
	if _, fuzzing := t.(*testing.F); fuzzing {
		return hclog.NewNullLogger()
	}
	w := &testWriter{t: t}
	t.Cleanup(w.stop)
	var out io.Writer = w
	if os.Getenv("BATON_TEST_LOG") == "stderr" {
		// Also straight to stderr: what a process that exits without
		// finishing its test (an os.Exit deep in a library) logged last.
		out = io.MultiWriter(w, os.Stderr)
	}
	return hclog.New(&hclog.LoggerOptions{
		Name:   t.Name(),
		Level:  hclog.Debug,
		Output: out,
	})
}

type testWriter struct {
	mu   sync.Mutex
	t    testing.TB
	done bool
}

func (w *testWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

func (w *testWriter) stop() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.done = true
}

// Etcd starts an embedded cluster with fast timings in t.TempDir() and
// closes it when the test ends. Register client cleanups after this call
// so that they run first.
func Etcd(t testing.TB, members int) *etcdcluster.Cluster {
	t.Helper()
	return EtcdWith(t, etcdcluster.Config{Members: members, FastTimings: true})
}

// EtcdWith starts an embedded cluster configured by cfg (its Dir, Logger
// and LogLevel are filled in) and closes it when the test ends.
func EtcdWith(t testing.TB, cfg etcdcluster.Config) *etcdcluster.Cluster {
	t.Helper()
	cfg.Dir, cfg.Logger, cfg.LogLevel = t.TempDir(), Logger(t).Named("etcd"), "error"
	e, err := etcdcluster.Start(cfg)
	if err != nil {
		t.Fatalf("start embedded etcd: %v", err)
	}
	t.Cleanup(func() { e.Close() })
	return e
}

// Client returns a new client of e (or of the given endpoints), closed
// when the test ends.
func Client(t testing.TB, e *etcdcluster.Cluster, endpoints ...string) *clientv3.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cli, err := e.NewClient(ctx, endpoints...)
	if err != nil {
		t.Fatalf("etcd client: %v", err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

// Proxy starts etcd's fault-injection proxy on a free loopback port in
// front of target (a URL such as "http://127.0.0.1:2379") and closes it
// when the test ends. The returned URL is what clients should dial.
func Proxy(t testing.TB, target string) (proxy.Server, string) {
	t.Helper()
	to, err := url.Parse(target)
	if err != nil {
		t.Fatalf("proxy target %q: %v", target, err)
	}
	for attempt := 0; ; attempt++ {
		port, err := freePort()
		if err != nil {
			t.Fatal(err)
		}
		from := url.URL{Scheme: "tcp", Host: fmt.Sprintf("127.0.0.1:%d", port)}
		p := proxy.NewServer(proxy.ServerConfig{
			Logger: zap.NewNop(),
			From:   from,
			To:     url.URL{Scheme: "tcp", Host: to.Host},
		})
		select {
		case <-p.Ready():
			t.Cleanup(func() { p.Close() })
			return p, "http://" + from.Host
		case err := <-p.Error():
			p.Close()
			if attempt < 5 {
				continue // the port was taken meanwhile
			}
			t.Fatalf("start proxy: %v", err)
		}
	}
}

// ProxyAt starts a proxy again at a URL a closed one used (the port is
// free again), in front of target, so that clients that dialled it can
// reconnect.
func ProxyAt(t testing.TB, at, target string) proxy.Server {
	t.Helper()
	from, err := url.Parse(at)
	if err != nil {
		t.Fatal(err)
	}
	to, err := url.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	p := proxy.NewServer(proxy.ServerConfig{
		Logger: zap.NewNop(),
		From:   url.URL{Scheme: "tcp", Host: from.Host},
		To:     url.URL{Scheme: "tcp", Host: to.Host},
	})
	select {
	case <-p.Ready():
	case err := <-p.Error():
		p.Close()
		t.Fatalf("proxy at %s: %v", at, err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// Eventually polls cond every few milliseconds until it returns true, and
// fails the test if that does not happen within timeout.
func Eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// IgnoreHardStoppedEtcd is the goleak option for packages whose tests use
// etcdcluster.Cluster.StopAll: a peer request that reaches a member between its
// raft stop and the close of its listeners leaves one goroutine of etcd's
// peer handler blocked on the closed backend for good.
var IgnoreHardStoppedEtcd = goleak.IgnoreAnyFunction("go.etcd.io/etcd/server/v3/etcdserver/api/etcdhttp.newPeerHandler.versionHandler.func1")

// Must returns v, panicking if err is not nil: for test setup whose
// failure is a bug in the test.
func Must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}
