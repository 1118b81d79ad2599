package etcdcluster_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/etcdcluster"
	"github.com/batonhq/baton/internal/testutil"
)

func TestEmbeddedTemporaryDirectoryIsRemovedOnClose(t *testing.T) {
	e, err := etcdcluster.Start(etcdcluster.Config{FastTimings: true})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := e.Client().Put(ctx, "k", "v"); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Dir(e.MemberDir(0))
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("temporary directory %s survived Close: %v", dir, err)
	}
	if err := e.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

func TestEmbeddedRefusesADirectoryWithOldData(t *testing.T) {
	dir := t.TempDir()
	e, err := etcdcluster.Start(etcdcluster.Config{Dir: dir, FastTimings: true})
	if err != nil {
		t.Fatal(err)
	}
	e.Close()
	if _, err := os.Stat(filepath.Join(dir, "m0")); err != nil {
		t.Fatalf("a given Dir must keep its data without RemoveData: %v", err)
	}
	if _, err := etcdcluster.Start(etcdcluster.Config{Dir: dir, FastTimings: true}); !errors.Is(err, coord.ErrInvalidConfig) {
		t.Fatalf("start over old data = %v, want ErrInvalidConfig", err)
	}

	clean := t.TempDir()
	e, err = etcdcluster.Start(etcdcluster.Config{Dir: clean, FastTimings: true, RemoveData: true})
	if err != nil {
		t.Fatal(err)
	}
	e.Close()
	if entries, _ := os.ReadDir(clean); len(entries) != 0 {
		t.Fatalf("RemoveData left %d entries in %s", len(entries), clean)
	}
}

func TestEmbeddedConfigErrors(t *testing.T) {
	for _, cfg := range []etcdcluster.Config{{Members: 2}, {Members: -1}, {LogLevel: "loud"}} {
		if _, err := etcdcluster.Start(cfg); !errors.Is(err, coord.ErrInvalidConfig) {
			t.Errorf("StartEmbedded(%+v) = %v, want ErrInvalidConfig", cfg, err)
		}
	}
}

func TestEmbeddedLogsGoToTheGivenLoggerOnly(t *testing.T) {
	var mu sync.Mutex
	var buf bytes.Buffer
	logger := hclog.New(&hclog.LoggerOptions{Output: &lockedWriter{mu: &mu, w: &buf}, Level: hclog.Debug})
	e, err := etcdcluster.Start(etcdcluster.Config{FastTimings: true, Logger: logger, LogLevel: "info"})
	if err != nil {
		t.Fatal(err)
	}
	e.Close()
	mu.Lock()
	defer mu.Unlock()
	if !strings.Contains(buf.String(), "etcd") {
		t.Fatalf("etcd's info logs did not reach the logger:\n%.500s", buf.String())
	}
}

type lockedWriter struct {
	mu *sync.Mutex
	w  *bytes.Buffer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func TestEmbeddedClusterStopAndRestartMembers(t *testing.T) {
	e := testutil.Etcd(t, 3)
	cli := testutil.Client(t, e)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if n := len(e.Endpoints()); n != 3 {
		t.Fatalf("%d endpoints", n)
	}
	leader, err := e.Leader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	follower := (leader + 1) % 3
	if err := e.Stop(follower); err != nil {
		t.Fatal(err)
	}
	if err := e.Stop(follower); err == nil {
		t.Fatal("stopping a stopped member succeeded")
	}
	if _, err := cli.Put(ctx, "k", "with a follower down"); err != nil {
		t.Fatal(err)
	}
	stopped, err := e.StopLeader(ctx)
	if err != nil || stopped != leader {
		t.Fatalf("StopLeader = %d, %v; want %d", stopped, err, leader)
	}
	// One member of three left: no quorum, no leader. (Stopping the
	// leader hands leadership to a follower first; a lone leader steps
	// down one election timeout after it lost its quorum.)
	testutil.Eventually(t, 5*time.Second, "the lone member to have no leader", func() bool {
		short, stop := context.WithTimeout(ctx, 50*time.Millisecond)
		defer stop()
		_, err := e.Leader(short)
		return err != nil
	})
	for _, i := range []int{leader, follower} {
		if err := e.Restart(ctx, i); err != nil {
			t.Fatalf("restart %d: %v", i, err)
		}
	}
	if _, err := e.Leader(ctx); err != nil {
		t.Fatal(err)
	}
	resp, err := cli.Get(ctx, "k")
	if err != nil || len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != "with a follower down" {
		t.Fatalf("get after restarts: %v, %v", resp, err)
	}
}
