// pause: the process that holds a pod sandbox's namespaces (the job of Kubernetes' build/pause).
// devcluster.images builds it statically (CGO_ENABLED=0) into the node's sandbox image, so the
// node needs no registry. It waits for signals: SIGINT/SIGTERM end it, SIGCHLD reaps zombies
// (it is PID 1 of pods that share their process namespace).
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for sig := range signals {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var status syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
