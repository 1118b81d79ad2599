package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"go.uber.org/goleak"

	"github.com/batonhq/baton/internal/testutil"
)

// nodeBinary is examples/node, built once per test run, so that servers
// run as child processes: a crash is a real SIGKILL, a pause a real
// SIGSTOP.
var nodeBinary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "baton-integration-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	nodeBinary = filepath.Join(dir, "node")
	build := exec.Command("go", "build", "-o", nodeBinary, "github.com/batonhq/baton/examples/node")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build examples/node:", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := 0
	func() {
		defer os.RemoveAll(dir)
		code = m.Run()
	}()
	if code == 0 {
		if err := goleak.Find(testutil.IgnoreHardStoppedEtcd); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	os.Exit(code)
}
